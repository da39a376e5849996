//! The transmission phase of one connection: read requests, run them against
//! the export concurrently, write the replies.
//!
//! Owns three kinds of task per connection: the reader (this connection's
//! task: parses headers, validates, reads WRITE payloads, dispatches), one
//! task per in-flight request (calls the export), and one writer (the only
//! one that touches the socket's write half; it batches replies and flushes
//! when none are queued, so a deep queue costs few syscalls).
//!
//! Must never: apply a WRITE whose payload did not fully arrive; let one
//! connection pin more than [`MAX_IN_FLIGHT`] requests or [`BYTE_BUDGET`]
//! bytes of payload (the reader stops reading until replies have been
//! written); leave a request without a reply while the connection is alive
//! (a guard answers EIO if the export panics); or call the export once the
//! connection has finished shutting down.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::proto::{self, Action, ExportInfo, ProtocolError, Request};
use super::Export;

/// Requests one connection may have between reading the header and writing
/// the reply. Deep enough for QD32 benchmarks and nbdcopy's 64 requests.
pub(crate) const MAX_IN_FLIGHT: usize = 64;
/// Payload bytes (reads and writes) one connection may hold at once.
pub(crate) const BYTE_BUDGET: usize = 64 * 1024 * 1024;
/// The byte budget is counted in units of this many bytes (a semaphore counts
/// in u32 permits).
const BUDGET_UNIT: usize = 4096;
const READ_BUFFER: usize = 256 * 1024;
const WRITE_BUFFER: usize = 256 * 1024;

/// What the shutdown signal carries: the instant by which in-flight requests
/// must have been answered.
pub(crate) type ShutdownRx = watch::Receiver<Option<Instant>>;

/// Waits for the shutdown signal and returns its deadline. A dropped sender
/// counts as a shutdown with no grace.
pub(crate) async fn shutdown_deadline(rx: &mut ShutdownRx) -> Instant {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v.unwrap_or_else(Instant::now),
        Err(_) => Instant::now(),
    }
}

/// Returns when the shutdown grace period has run out.
async fn grace_over(mut rx: ShutdownRx) {
    let deadline = shutdown_deadline(&mut rx).await;
    tokio::time::sleep_until(deadline).await;
}

/// Permits held from reading a request until its reply has been written.
struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

struct Reply {
    cookie: u64,
    error: u32,
    data: Vec<u8>,
    _permits: Permits,
}

type ReplyTx = mpsc::UnboundedSender<Reply>;

/// A validated request ready for the export.
struct Job {
    cookie: u64,
    action: Action,
    payload: Vec<u8>,
    permits: Permits,
}

enum Incoming {
    Job(Job),
    /// Answered without the export (validation error, zero length, cache).
    Reply(Reply),
    Disconnect,
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("client closed the connection")]
    Eof,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("WRITE of {0} bytes is beyond any acceptable payload")]
    PayloadTooLarge(u32),
}

struct Reader<R> {
    rd: BufReader<R>,
    info: ExportInfo,
    slots: Arc<Semaphore>,
    budget: Arc<Semaphore>,
}

fn budget_units(len: u32) -> u32 {
    (len as usize).div_ceil(BUDGET_UNIT) as u32
}

/// Reads one request (and a WRITE's payload). Takes the reader by value and
/// hands it back so the future can be kept across `select!` iterations
/// without being cancelled half-way through a request.
async fn read_next<R: AsyncRead + Unpin>(mut r: Reader<R>) -> (Reader<R>, Result<Incoming, ReadError>) {
    let res = r.read_one().await;
    (r, res)
}

impl<R: AsyncRead + Unpin> Reader<R> {
    async fn read_one(&mut self) -> Result<Incoming, ReadError> {
        // Backpressure: no slot, no reading. Semaphores here are never
        // closed, so acquisition cannot fail; map it anyway rather than panic.
        let closed = || std::io::Error::other("request semaphore closed");
        let slot = self.slots.clone().acquire_owned().await.map_err(|_| closed())?;

        // A clean EOF between requests is how many clients hang up.
        if self.rd.fill_buf().await?.is_empty() {
            return Err(ReadError::Eof);
        }
        let mut header = [0u8; proto::REQUEST_HEADER_LEN];
        self.rd.read_exact(&mut header).await?;
        let req = proto::parse_request(&header)?;

        let reply = |error: u32, slot| Reply {
            cookie: req.cookie,
            error,
            data: Vec::new(),
            _permits: Permits { _slot: slot, _bytes: None },
        };
        let action = match proto::check_request(&req, &self.info) {
            Ok(action) => action,
            Err(errno) => {
                self.skip_payload(&req).await?;
                return Ok(Incoming::Reply(reply(errno, slot)));
            }
        };
        let payload_units = match action {
            Action::Read { len, .. } | Action::Write { len, .. } => budget_units(len),
            _ => 0,
        };
        let bytes = if payload_units > 0 {
            Some(self.budget.clone().acquire_many_owned(payload_units).await.map_err(|_| closed())?)
        } else {
            None
        };
        let permits = Permits { _slot: slot, _bytes: bytes };
        let payload = match action {
            Action::Write { len, .. } => {
                // check_request bounded len by the maximum payload. Read
                // without zeroing first; a large payload bypasses the
                // reader's buffer (one copy, from the kernel).
                let buf = crate::volume::wire::read_payload(&mut self.rd, len as usize).await?;
                // If the client goes away now, this fails and the write is
                // never dispatched: a torn WRITE is never applied.
                if buf.len() < len as usize {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                }
                buf
            }
            Action::Disconnect => return Ok(Incoming::Disconnect),
            Action::Nothing => {
                return Ok(Incoming::Reply(Reply { cookie: req.cookie, error: 0, data: Vec::new(), _permits: permits }))
            }
            _ => Vec::new(),
        };
        Ok(Incoming::Job(Job { cookie: req.cookie, action, payload, permits }))
    }

    /// Consumes the payload of a refused WRITE so the next header is found,
    /// without buffering it; gives up (closing the connection) above the cap.
    async fn skip_payload(&mut self, req: &Request) -> Result<(), ReadError> {
        let len = req.payload_len();
        if len == 0 {
            return Ok(());
        }
        if len > proto::WRITE_DISCARD_CAP {
            return Err(ReadError::PayloadTooLarge(len));
        }
        let copied = tokio::io::copy(&mut (&mut self.rd).take(u64::from(len)), &mut tokio::io::sink()).await?;
        if copied < u64::from(len) {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        Ok(())
    }
}

/// Sends the reply of one request exactly once: explicitly with
/// [`Pending::finish`], or from `Drop` if the request task panicked (EIO) or
/// was aborted at the end of the shutdown grace (ESHUTDOWN), so the client is
/// never left waiting on a cookie.
struct Pending {
    cookie: u64,
    tx: ReplyTx,
    permits: Option<Permits>,
}

impl Pending {
    fn send(&mut self, error: u32, data: Vec<u8>) {
        if let Some(permits) = self.permits.take() {
            // A closed channel means the writer is gone with the socket.
            let _ = self.tx.send(Reply { cookie: self.cookie, error, data, _permits: permits });
        }
    }

    fn finish(mut self, error: u32, data: Vec<u8>) {
        self.send(error, data);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let error = if std::thread::panicking() { proto::EIO } else { proto::ESHUTDOWN };
        self.send(error, Vec::new());
    }
}

fn status(res: std::io::Result<()>) -> u32 {
    match res {
        Ok(()) => 0,
        Err(e) => {
            tracing::debug!(error = %e, "nbd: export error");
            proto::errno_for(&e)
        }
    }
}

/// Runs one request against the export and queues its reply.
async fn execute(export: Arc<dyn Export>, job: Job, tx: ReplyTx) {
    let pending = Pending { cookie: job.cookie, tx, permits: Some(job.permits) };
    let (error, data) = match job.action {
        Action::Read { offset, len } => match export.read(offset, len).await {
            Ok(data) if data.len() == len as usize => (0, data),
            Ok(data) => {
                // A simple reply cannot carry a short read.
                tracing::warn!(offset, len, got = data.len(), "nbd: export returned a short read");
                (proto::EIO, Vec::new())
            }
            Err(e) => (status(Err(e)), Vec::new()),
        },
        Action::Write { offset, fua, .. } => (status(export.write(offset, job.payload, fua).await), Vec::new()),
        Action::Flush => (status(export.flush().await), Vec::new()),
        Action::Trim { offset, len, fua } => {
            // The export's trim has no FUA; a flush gives the same guarantee.
            let mut res = export.trim(offset, len).await;
            if res.is_ok() && fua {
                res = export.flush().await;
            }
            (status(res), Vec::new())
        }
        Action::WriteZeroes { offset, len, fua } => (status(export.write_zeroes(offset, len, fua).await), Vec::new()),
        Action::Disconnect | Action::Nothing => (0, Vec::new()),
    };
    pending.finish(error, data);
}

/// The single writer of a connection. Writes every queued reply, then
/// flushes only once the queue is empty.
async fn write_replies<W: AsyncWrite + Unpin>(w: W, mut rx: mpsc::UnboundedReceiver<Reply>) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, w);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next {
            w.write_all(&proto::encode_simple_reply(reply.cookie, reply.error)).await?;
            if reply.error == 0 && !reply.data.is_empty() {
                w.write_all(&reply.data).await?;
            }
            // Dropping the reply releases its permits: the reader may go on.
            drop(reply);
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    w.shutdown().await
}

/// Serves transmission on an already negotiated connection until the client
/// disconnects, breaks the protocol, or the server shuts down.
pub(crate) async fn serve<R, W>(r: R, w: W, export: Arc<dyn Export>, info: ExportInfo, mut shutdown: ShutdownRx)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let mut writer = tokio::spawn(write_replies(w, rx));
    let mut tasks = JoinSet::new();
    let reader = Reader {
        rd: BufReader::with_capacity(READ_BUFFER, r),
        info,
        slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        budget: Arc::new(Semaphore::new(BYTE_BUDGET / BUDGET_UNIT)),
    };
    let mut reading = Box::pin(read_next(reader));
    // Once shutdown starts, requests still arriving are answered ESHUTDOWN
    // (as the spec asks) until the in-flight ones are done.
    let mut draining = false;
    let mut deadline = Instant::now();

    loop {
        tokio::select! {
            biased;
            d = shutdown_deadline(&mut shutdown), if !draining => {
                draining = true;
                deadline = d;
                if tasks.is_empty() {
                    break;
                }
            }
            () = tokio::time::sleep_until(deadline), if draining => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined {
                    if e.is_panic() {
                        tracing::error!("nbd: a request task panicked (answered EIO)");
                    }
                }
                if draining && tasks.is_empty() {
                    break;
                }
            }
            // The writer ends only when the socket is broken.
            () = tx.closed() => break,
            (rd, res) = &mut reading => {
                match res {
                    Ok(Incoming::Job(job)) if draining => {
                        let _ = tx.send(Reply { cookie: job.cookie, error: proto::ESHUTDOWN, data: Vec::new(), _permits: job.permits });
                    }
                    Ok(Incoming::Job(job)) => {
                        tasks.spawn(execute(export.clone(), job, tx.clone()));
                    }
                    Ok(Incoming::Reply(reply)) => {
                        let _ = tx.send(reply);
                    }
                    Ok(Incoming::Disconnect) | Err(ReadError::Eof) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "nbd: closing connection");
                        break;
                    }
                }
                reading.set(read_next(rd));
            }
        }
    }
    // Stop reading: a half-read WRITE is dropped here, never applied.
    drop(reading);

    // NBD_CMD_DISC (and a vanished client) still get their in-flight requests
    // completed; under shutdown only until the grace runs out, after which
    // the tasks are aborted and awaited so none reaches the export later.
    let grace = grace_over(shutdown.clone());
    tokio::pin!(grace);
    let mut expired = false;
    while !tasks.is_empty() {
        tokio::select! {
            _ = tasks.join_next() => {}
            () = &mut grace => {
                expired = true;
                tasks.shutdown().await;
            }
        }
    }
    drop(tx);
    if expired {
        writer.abort();
        let _ = writer.await;
        return;
    }
    tokio::select! {
        res = &mut writer => {
            if let Ok(Err(e)) = res {
                tracing::debug!(error = %e, "nbd: writing replies failed");
            }
        }
        () = &mut grace => {
            writer.abort();
            let _ = writer.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::nbd::proto::Command;

    /// Reads panic; everything else succeeds.
    struct Panicky;

    #[async_trait::async_trait]
    impl Export for Panicky {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn block_sizes(&self) -> (u32, u32, u32) {
            (512, 4096, 1 << 20)
        }
        fn read_only(&self) -> bool {
            false
        }
        fn multi_conn(&self) -> bool {
            false
        }
        async fn read(&self, _: u64, _: u32) -> std::io::Result<Vec<u8>> {
            panic!("export bug (expected by this test)")
        }
        async fn write(&self, _: u64, _: Vec<u8>, _: bool) -> std::io::Result<()> {
            Ok(())
        }
        async fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        async fn trim(&self, _: u64, _: u32) -> std::io::Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u32, _: bool) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn header(command: Command, cookie: u64, len: u32) -> [u8; proto::REQUEST_HEADER_LEN] {
        Request { flags: 0, command, cookie, offset: 0, len }.encode()
    }

    async fn reply(r: &mut (impl AsyncRead + Unpin)) -> (u32, u64) {
        let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
        r.read_exact(&mut h).await.expect("reply");
        assert_eq!(h[..4], proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let mut cookie = [0u8; 8];
        cookie.copy_from_slice(&h[8..]);
        (error, u64::from_be_bytes(cookie))
    }

    #[tokio::test]
    async fn a_panicking_export_gets_eio_and_the_connection_survives() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(server);
        let (_signal, shutdown) = watch::channel(None);
        let info = ExportInfo::new(1 << 20, (512, 4096, 1 << 20), false, false).expect("valid sizes");
        let serving = tokio::spawn(serve(r, w, Arc::new(Panicky), info, shutdown));
        let (mut cr, mut cw) = tokio::io::split(client);

        for cookie in [1, 2] {
            cw.write_all(&header(Command::Read, cookie, 512)).await.expect("send");
            assert_eq!(reply(&mut cr).await, (proto::EIO, cookie));
        }
        cw.write_all(&header(Command::Write, 3, 512)).await.expect("send");
        cw.write_all(&[0u8; 512]).await.expect("payload");
        assert_eq!(reply(&mut cr).await, (0, 3));
        cw.write_all(&header(Command::Disc, 4, 0)).await.expect("send");
        tokio::time::timeout(std::time::Duration::from_secs(5), serving)
            .await
            .expect("DISC ends the connection")
            .expect("no panic escapes");
    }

    #[tokio::test]
    async fn shutdown_refuses_new_requests_and_ends_idle_connections() {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (r, w) = tokio::io::split(server);
        let (signal, shutdown) = watch::channel(None);
        let info = ExportInfo::new(1 << 20, (512, 4096, 1 << 20), false, false).expect("valid sizes");
        let serving = tokio::spawn(serve(r, w, Arc::new(Panicky), info, shutdown));
        let (mut cr, mut cw) = tokio::io::split(client);
        cw.write_all(&header(Command::Flush, 1, 0)).await.expect("send");
        assert_eq!(reply(&mut cr).await, (0, 1));
        signal.send_replace(Some(Instant::now() + std::time::Duration::from_secs(5)));
        tokio::time::timeout(std::time::Duration::from_secs(2), serving)
            .await
            .expect("an idle connection closes at once")
            .expect("no panic");
        let mut rest = Vec::new();
        cr.read_to_end(&mut rest).await.expect("EOF");
        assert!(rest.is_empty());
    }
}
