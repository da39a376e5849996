//! The secondary's side: serving one connection from a primary. It runs
//! the handshake check ([`handshake::check`], the same one the primary runs),
//! records the epoch it now follows, forgets what a resync is about to
//! overwrite, then applies the primary's frames in order and answers each.
//!
//! It must never follow a primary whose epoch is older than one it has
//! seen, nor two primaries at once: a newer primary supersedes the current
//! connection.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tandem_raft::volume::DiskState;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use super::{io_err, kind_of, punch_hole, Volume};
use crate::volume::generation::{Decision, Generations};
use crate::volume::handshake::{self, End};
use crate::volume::store::{Meta, Replica};
use crate::volume::wire::{self, Hello, HelloReply, Message};

impl Volume {
    pub(super) fn drop_upstream(&self) {
        if let Some((_, stop)) = self.upstream.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = stop.send(true);
        }
    }

    /// Serves one connection from a primary (its Hello already read).
    pub async fn serve<R, W>(self: Arc<Self>, hello: Hello, rd: R, wr: W) -> Result<(), String>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let res = self.clone().serve_inner(id, hello, rd, wr).await;
        let mut up = self.upstream.lock().unwrap_or_else(|p| p.into_inner());
        if up.as_ref().is_some_and(|(i, _)| *i == id) {
            *up = None;
        }
        res
    }

    async fn serve_inner<R, W>(self: Arc<Self>, id: u64, hello: Hello, rd: R, mut wr: W) -> Result<(), String>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        let end =
            || End::Secondary { primary_here: self.is_primary(), knows_primary: self.links.contains_key(&hello.node) };
        // A primary that grew before this replica did: grow first, so that
        // nothing it sends can fall past this replica's end.
        let grow = handshake::grow_first(end(), &hello, &self.hello_reply(&self.replica(), &hello));
        let grown = match grow {
            Some(size) => self.grow_files(size).map(|_| self.exported.fetch_max(size, Ordering::SeqCst)),
            None => Ok(0),
        };
        let accepted = {
            let mut r = self.replica();
            let mut reply = self.hello_reply(&r, &hello);
            let checked = match grown {
                Err(e) => Err(format!("cannot grow to the primary's {} bytes: {e}", hello.size)),
                Ok(_) => handshake::check(end(), &hello, &reply).map_err(|refusal| refusal.to_string()),
            };
            match checked {
                Err(refusal) => {
                    reply.accepted = false;
                    reply.reason = Some(refusal);
                    Err(reply)
                }
                Ok(decision) => {
                    r.meta.epoch_seen = hello.epoch;
                    r.meta.upstream = Some((hello.node.clone(), hello.epoch));
                    let mut bitmap = None;
                    // Inconsistent only while blocks are actually coming: a
                    // replica with nothing to receive stays promotable.
                    let needs_data = match decision {
                        Decision::InSync | Decision::Incremental => {
                            hello.changed_blocks > 0 || !reply.crashed_extents.is_empty()
                        }
                        _ => true,
                    };
                    if handshake::follows(decision) {
                        if let Decision::SplitBrain { .. } = decision {
                            bitmap = r.bitmaps.get(&hello.node).map(|b| b.words().to_vec());
                        }
                        if needs_data {
                            // Forget what is about to be overwritten, so an
                            // interrupted resync resumes instead of splitting.
                            let base = match decision {
                                Decision::Full => None,
                                Decision::InSync => Some(r.meta.current),
                                _ => Some(hello.generation.bitmap),
                            };
                            let mut g = r.meta.generations_for(&hello.node);
                            g.sync_started_as_target(base);
                            set_generations(&mut r.meta, &hello.node, g);
                            r.meta.disk = DiskState::Inconsistent;
                        }
                    }
                    r.save_meta().map_err(|e| e.to_string())?;
                    Ok((reply, decision, bitmap))
                }
            }
        };
        let (reply, decision, my_bitmap) = match accepted {
            Ok(accepted) => accepted,
            Err(refused) => {
                let _ = wire::write_frame(&mut wr, 0, &Message::HelloReply(refused.clone())).await;
                let _ = wr.flush().await;
                return Err(refused.reason.unwrap_or_default());
            }
        };
        // A newer primary supersedes the current one.
        let (stop_tx, mut stop_rx) = watch::channel(false);
        {
            let mut up = self.upstream.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, old)) = up.take() {
                let _ = old.send(true);
            }
            *up = Some((id, stop_tx));
        }
        wire::write_frame(&mut wr, 0, &Message::HelloReply(reply)).await.map_err(|e| e.to_string())?;
        if let Some(words) = my_bitmap {
            let per = 64 * 1024;
            let chunks: Vec<_> = words.chunks(per).collect();
            if chunks.is_empty() {
                wire::write_frame(&mut wr, 0, &Message::BitmapChunk { first_bit: 0, words: Vec::new(), last: true })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            for (i, c) in chunks.iter().enumerate() {
                let msg = Message::BitmapChunk {
                    first_bit: (i * per * 64) as u64,
                    words: c.to_vec(),
                    last: i + 1 == chunks.len(),
                };
                wire::write_frame(&mut wr, 0, &msg).await.map_err(|e| e.to_string())?;
            }
        }
        wr.flush().await.map_err(|e| e.to_string())?;
        if !handshake::follows(decision) {
            return Err(format!("not following {}: {decision:?}", hello.node));
        }
        let primary = hello.node.clone();
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        loop {
            let frame = tokio::select! {
                f = wire::read_frame(&mut rd) => f,
                _ = stop_rx.changed() => {
                    let _ = wire::write_frame(&mut wr, 0, &Message::Goodbye { reason: "superseded by a newer primary".into() }).await;
                    let _ = wr.flush().await;
                    return Err("superseded".into());
                }
            };
            let (seq, msg) = match frame {
                Ok(f) => f,
                Err(wire::WireError::Closed) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            };
            let answer = self.apply_from_primary(&primary, msg).await;
            let out = match answer {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => Message::Nack { errno: e.raw_os_error().unwrap_or(libc::EIO), message: e.to_string() },
            };
            wire::write_frame(&mut wr, seq, &out).await.map_err(|e| e.to_string())?;
            if rd.buffer().is_empty() {
                wr.flush().await.map_err(|e| e.to_string())?;
            }
        }
    }

    /// This replica's answer to `hello`, before the check fills in whether
    /// it is accepted.
    fn hello_reply(&self, r: &Replica, hello: &Hello) -> HelloReply {
        HelloReply {
            accepted: true,
            reason: None,
            node: self.cfg.node.clone(),
            volume_id: self.cfg.volume_id.clone(),
            size: r.size(),
            granule: self.cfg.granule,
            disk: r.meta.disk,
            primary_since_ms: r.meta.primary_since_ms,
            generation: r.meta.generations_for(&hello.node),
            changed_blocks: r.bitmaps.get(&hello.node).map(|b| b.count()).unwrap_or(0),
            crashed_extents: r.extents_to_report(&hello.node, hello.epoch),
            epoch_seen: r.meta.epoch_seen,
            replaced: r.meta.replaced,
        }
    }

    async fn apply_from_primary(&self, primary: &str, msg: Message) -> io::Result<Option<Message>> {
        match msg {
            Message::Grow { size } => {
                // Before any later frame (this stream is applied in order).
                self.grow_files(size)?;
                self.exported.fetch_max(size, Ordering::SeqCst);
                Ok(Some(Message::Ack))
            }
            Message::Write { offset, data, fua } => {
                self.check_range(offset, data.len() as u64)?;
                self.replica().activate(offset, data.len() as u64)?;
                self.data.write_all_at(&data, offset)?;
                if fua {
                    self.sync().await?;
                }
                Ok(Some(Message::Ack))
            }
            Message::ResyncData { offset, data } => {
                self.check_range(offset, data.len() as u64)?;
                self.replica().activate(offset, data.len() as u64)?;
                self.data.write_all_at(&data, offset)?;
                Ok(Some(Message::Ack))
            }
            Message::Trim { offset, len } => {
                self.check_range(offset, u64::from(len))?;
                self.replica().activate(offset, u64::from(len))?;
                punch_hole(&self.data, offset, u64::from(len))?;
                Ok(Some(Message::Ack))
            }
            Message::Zeroes { offset, len, fua } => {
                self.check_range(offset, u64::from(len))?;
                self.replica().activate(offset, u64::from(len))?;
                punch_hole(&self.data, offset, u64::from(len))?;
                if fua {
                    self.sync().await?;
                }
                Ok(Some(Message::Ack))
            }
            Message::Flush => {
                self.sync().await?;
                Ok(Some(Message::Ack))
            }
            Message::ResyncDone { generation } => {
                self.sync().await?;
                let mut r = self.replica();
                let mut g = r.meta.generations_for(primary);
                g.sync_finished_as_target(&generation).map_err(|e| io_err(e.to_string()))?;
                set_generations(&mut r.meta, primary, g);
                if let Some(bm) = r.bitmaps.get_mut(primary) {
                    for b in 0..bm.bits() {
                        bm.clear(b);
                    }
                }
                r.meta.disk = DiskState::UpToDate;
                r.persist_bitmaps()?;
                r.reconciled()?;
                r.save_meta()?;
                tracing::info!(volume = %self.cfg.name, "up to date with {primary}");
                Ok(Some(Message::Ack))
            }
            Message::NewGeneration { current } => {
                let mut r = self.replica();
                if r.meta.disk == DiskState::UpToDate {
                    let mut g = r.meta.generations_for(primary);
                    g.follow_generation(current).map_err(|e| io_err(e.to_string()))?;
                    set_generations(&mut r.meta, primary, g);
                    r.save_meta()?;
                }
                Ok(None)
            }
            Message::ReadRequest { offset, len } => {
                self.check_range(offset, u64::from(len))?;
                let mut buf = vec![0u8; len as usize];
                self.data.read_exact_at(&mut buf, offset)?;
                Ok(Some(Message::ResyncData { offset, data: bytes::Bytes::from(buf) }))
            }
            Message::DigestRequest { offset, len, granule } => {
                self.check_range(offset, u64::from(len))?;
                let mut buf = vec![0u8; len as usize];
                self.data.read_exact_at(&mut buf, offset)?;
                let digests = buf.chunks(granule.max(512) as usize).map(wire::digest).collect();
                Ok(Some(Message::Digests { offset, granule, digests }))
            }
            other => Err(io_err(format!("unexpected {} from the primary", kind_of(&other)))),
        }
    }
}

/// Stores one peer's view of the generations back into the metadata.
fn set_generations(meta: &mut Meta, peer: &str, g: Generations) {
    meta.current = g.current;
    meta.history = g.history;
    meta.bitmap_gens.insert(peer.to_string(), g.bitmap);
}
