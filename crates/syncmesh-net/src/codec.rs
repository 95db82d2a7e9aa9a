//! Framing of direct messages: a request is a batch of opaque messages (the node's replication
//! layer decodes them), each length-prefixed; the response is one status byte ([`Ack`]), so a
//! sender learns when a peer ignored its messages because it does not trust the sender. The
//! join protocol carries one opaque message each way ([`JoinCodec`]). Sizes are checked before
//! anything is allocated.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::request_response;
use libp2p::StreamProtocol;

/// The direct-message protocol.
/// Version 6 addresses a shard document with its history generation; version 3 carries
/// change signatures; version 2 answered with a status byte but sent no signatures, version 1
/// (before trust) neither: a peer running an older one fails to negotiate, which is logged as
/// an older protocol.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/syncmesh/direct/6");
/// The join protocol (an invitee proves it holds a ticket).
pub const JOIN_PROTOCOL: StreamProtocol = StreamProtocol::new("/syncmesh/join/1");
/// Largest join request or answer.
pub const MAX_JOIN_MESSAGE: usize = 16 << 10;

/// What a peer answered to a batch of direct messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Taken for processing.
    Accepted,
    /// Ignored: the receiver does not trust the sender.
    NotTrusted,
}

/// Limits of one request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest single message.
    pub max_message: usize,
    /// Largest batch (sum of its messages).
    pub max_batch: usize,
    /// Most messages in one batch.
    pub max_count: usize,
}

/// The request-response codec: requests are `Vec<Vec<u8>>`, responses an [`Ack`].
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    limits: Limits,
}

impl Codec {
    /// A codec enforcing `limits` on what it reads.
    pub fn new(limits: Limits) -> Self {
        Codec { limits }
    }
}

fn too_large(what: &str, n: usize, max: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{what} of {n} exceeds the limit of {max}"),
    )
}

async fn read_u32<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<usize> {
    let mut b = [0u8; 4];
    io.read_exact(&mut b).await?;
    Ok(u32::from_be_bytes(b) as usize)
}

fn u32_of(n: usize) -> io::Result<[u8; 4]> {
    u32::try_from(n)
        .map(u32::to_be_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "message too large"))
}

impl request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Vec<Vec<u8>>;
    type Response = Ack;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<Vec<u8>>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let count = read_u32(io).await?;
        if count > self.limits.max_count {
            return Err(too_large("batch count", count, self.limits.max_count));
        }
        let mut total = 0usize;
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let len = read_u32(io).await?;
            if len > self.limits.max_message {
                return Err(too_large("message size", len, self.limits.max_message));
            }
            total = total.saturating_add(len);
            if total > self.limits.max_batch {
                return Err(too_large("batch size", total, self.limits.max_batch));
            }
            let mut buf = vec![0u8; len];
            io.read_exact(&mut buf).await?;
            out.push(buf);
        }
        Ok(out)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Ack>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await?;
        Ok(match b[0] {
            2 => Ack::NotTrusted,
            _ => Ack::Accepted,
        })
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<Vec<u8>>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&u32_of(req.len())?).await?;
        for m in &req {
            io.write_all(&u32_of(m.len())?).await?;
            io.write_all(m).await?;
        }
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        ack: Ack,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let b = match ack {
            Ack::Accepted => 1,
            Ack::NotTrusted => 2,
        };
        io.write_all(&[b]).await?;
        io.close().await
    }
}

/// The join protocol's codec: one length-prefixed message each way, at most
/// [`MAX_JOIN_MESSAGE`] bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct JoinCodec;

async fn read_one<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Vec<u8>> {
    let len = read_u32(io).await?;
    if len > MAX_JOIN_MESSAGE {
        return Err(too_large("join message", len, MAX_JOIN_MESSAGE));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_one<T: AsyncWrite + Unpin>(io: &mut T, m: &[u8]) -> io::Result<()> {
    io.write_all(&u32_of(m.len())?).await?;
    io.write_all(m).await?;
    io.close().await
}

impl request_response::Codec for JoinCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_one(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_one(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        m: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_one(io, &m).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        m: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_one(io, &m).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec as _;

    fn codec() -> Codec {
        Codec::new(Limits {
            max_message: 100,
            max_batch: 150,
            max_count: 3,
        })
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        let msgs = vec![b"hello".to_vec(), vec![], vec![7; 100]];
        run(codec().write_request(
            &PROTOCOL,
            &mut futures::io::Cursor::new(&mut buf),
            msgs.clone(),
        ))
        .unwrap();
        let got =
            run(codec().read_request(&PROTOCOL, &mut futures::io::Cursor::new(&buf))).unwrap();
        assert_eq!(got, msgs);
    }

    #[test]
    fn limits_and_truncation_are_errors() {
        let enc = |msgs: Vec<Vec<u8>>| {
            let mut buf = Vec::new();
            let mut big = Codec::new(Limits {
                max_message: usize::MAX,
                max_batch: usize::MAX,
                max_count: usize::MAX,
            });
            run(big.write_request(&PROTOCOL, &mut futures::io::Cursor::new(&mut buf), msgs))
                .unwrap();
            buf
        };
        let read =
            |buf: &[u8]| run(codec().read_request(&PROTOCOL, &mut futures::io::Cursor::new(buf)));
        assert!(read(&enc(vec![vec![0; 101]])).is_err(), "message too large");
        assert!(
            read(&enc(vec![vec![0; 100], vec![0; 60]])).is_err(),
            "batch too large"
        );
        assert!(read(&enc(vec![vec![]; 4])).is_err(), "too many messages");
        let ok = enc(vec![b"abc".to_vec()]);
        assert!(read(&ok[..ok.len() - 1]).is_err(), "truncated");
        // A length prefix claiming 4 GiB is refused before allocating.
        assert!(read(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn acks_and_join_messages_round_trip_and_are_bounded() {
        for ack in [Ack::Accepted, Ack::NotTrusted] {
            let mut buf = Vec::new();
            run(codec().write_response(&PROTOCOL, &mut futures::io::Cursor::new(&mut buf), ack))
                .unwrap();
            let got =
                run(codec().read_response(&PROTOCOL, &mut futures::io::Cursor::new(&buf))).unwrap();
            assert_eq!(got, ack);
        }
        let mut buf = Vec::new();
        run(JoinCodec.write_request(
            &JOIN_PROTOCOL,
            &mut futures::io::Cursor::new(&mut buf),
            b"join".to_vec(),
        ))
        .unwrap();
        let got = run(JoinCodec.read_request(&JOIN_PROTOCOL, &mut futures::io::Cursor::new(&buf)))
            .unwrap();
        assert_eq!(got, b"join");
        let huge = u32::try_from(MAX_JOIN_MESSAGE + 1).unwrap().to_be_bytes();
        assert!(run(
            JoinCodec.read_request(&JOIN_PROTOCOL, &mut futures::io::Cursor::new(&huge[..]))
        )
        .is_err());
    }
}
