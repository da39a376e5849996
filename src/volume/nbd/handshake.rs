//! Option haggling (fixed newstyle) on one freshly accepted connection, from
//! the greeting to the first byte of transmission.
//!
//! Owns: the byte exchange of the handshake and its bounds (option length,
//! number of options). The answers themselves come from
//! [`proto::answer_option`], which is pure.
//!
//! Must never: read ahead of the option it was told the length of (the bytes
//! that follow NBD_OPT_GO's final reply belong to the transmission reader, so
//! this code reads with exact lengths and no buffering), allocate more than
//! [`proto::MAX_OPTION_LEN`] for an option, or enter transmission for a name
//! it does not serve.

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::{self, ExportInfo, OptionOutcome, ProtocolError};

/// Options one connection may send before it must be in transmission. Real
/// clients send fewer than ten (qemu: structured replies, extended headers,
/// meta contexts, then GO); the bound stops a client looping forever.
pub(crate) const MAX_OPTIONS: usize = 256;

#[derive(Debug, Error)]
pub(crate) enum HandshakeError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("NBD_OPT_EXPORT_NAME refused: {0}")]
    Refused(String),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
}

/// How the handshake ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Negotiated {
    /// The stream is now in transmission.
    Transmission,
    /// The client sent NBD_OPT_ABORT (acknowledged); close.
    Aborted,
}

/// Runs the handshake on `stream` for the export `name`.
pub(crate) async fn negotiate<S>(stream: &mut S, name: &str, info: &ExportInfo) -> Result<Negotiated, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(&proto::encode_greeting()).await?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).await?;
    let client = proto::parse_client_flags(&flags)?;

    let mut out = Vec::with_capacity(256);
    for _ in 0..MAX_OPTIONS {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        stream.read_exact(&mut header).await?;
        let header = proto::parse_option_header(&header)?;
        // Bounded by parse_option_header.
        let mut data = vec![0u8; header.len as usize];
        stream.read_exact(&mut data).await?;

        out.clear();
        let outcome = proto::answer_option(name, info, client, header.option, &data, &mut out);
        if !out.is_empty() {
            stream.write_all(&out).await?;
        }
        match outcome {
            OptionOutcome::Continue => {}
            OptionOutcome::Transmission => return Ok(Negotiated::Transmission),
            OptionOutcome::Abort => return Ok(Negotiated::Aborted),
            OptionOutcome::Refuse(why) => return Err(HandshakeError::Refused(why)),
        }
    }
    Err(HandshakeError::TooManyOptions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::nbd::proto::{ClientOption, ExportQuery};

    fn info() -> ExportInfo {
        ExportInfo::new(1 << 20, (512, 4096, 1 << 20), false, false).expect("valid sizes")
    }

    async fn client_side(mut c: tokio::io::DuplexStream, options: Vec<Vec<u8>>) -> Vec<u8> {
        let mut greeting = [0u8; proto::GREETING_LEN];
        c.read_exact(&mut greeting).await.expect("greeting");
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        c.write_all(&3u32.to_be_bytes()).await.expect("flags");
        for o in options {
            c.write_all(&o).await.expect("option");
        }
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
        rest
    }

    #[tokio::test]
    async fn go_enters_transmission_after_unsupported_options() {
        let (mut s, c) = tokio::io::duplex(1 << 16);
        let go = ClientOption::Go(ExportQuery { name: "vol".into(), info_requests: vec![proto::INFO_BLOCK_SIZE] });
        let opts = vec![ClientOption::Unsupported(proto::OPT_STRUCTURED_REPLY).encode(), go.encode()];
        let client = tokio::spawn(client_side(c, opts));
        assert_eq!(negotiate(&mut s, "vol", &info()).await.expect("handshake"), Negotiated::Transmission);
        drop(s);
        let rest = client.await.expect("client");
        // UNSUP reply, two INFO replies and an ACK.
        assert!(rest.len() > 4 * 20);
    }

    #[tokio::test]
    async fn garbage_and_oversized_options_end_the_handshake() {
        let (mut s, c) = tokio::io::duplex(1 << 16);
        let client = tokio::spawn(client_side(c, vec![b"this is not an option header".to_vec()]));
        assert!(matches!(negotiate(&mut s, "vol", &info()).await, Err(HandshakeError::Protocol(_))));
        drop(s);
        client.await.expect("client");

        let (mut s, c) = tokio::io::duplex(1 << 16);
        let mut big = Vec::new();
        big.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        big.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        big.extend_from_slice(&u32::MAX.to_be_bytes());
        let client = tokio::spawn(client_side(c, vec![big]));
        assert!(matches!(
            negotiate(&mut s, "vol", &info()).await,
            Err(HandshakeError::Protocol(ProtocolError::OptionTooLong { .. }))
        ));
        drop(s);
        client.await.expect("client");
    }

    #[tokio::test]
    async fn unknown_export_name_is_refused_and_abort_is_acknowledged() {
        let (mut s, c) = tokio::io::duplex(1 << 16);
        let client = tokio::spawn(client_side(c, vec![ClientOption::ExportName("nope".into()).encode()]));
        assert!(matches!(negotiate(&mut s, "vol", &info()).await, Err(HandshakeError::Refused(_))));
        drop(s);
        assert!(client.await.expect("client").is_empty());

        let (mut s, c) = tokio::io::duplex(1 << 16);
        let client = tokio::spawn(client_side(c, vec![ClientOption::Abort.encode()]));
        assert_eq!(negotiate(&mut s, "vol", &info()).await.expect("abort"), Negotiated::Aborted);
        drop(s);
        assert_eq!(client.await.expect("client").len(), 20);
    }
}
