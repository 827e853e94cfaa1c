//! A flow's HTTP/2 stream as a byte stream (`AsyncRead` + `AsyncWrite`), on the h2 crate
//! directly: a write hands its bytes to the stream's send half from the writing task
//! (no task or channel in between, as hyper's upgraded streams have), a read hands over
//! the bytes of the frames received, releasing their flow-control capacity. Shutdown
//! ends the stream (the peer reads EOF); dropping it unended resets it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub(crate) struct H2Stream {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    /// Received bytes not read yet.
    pending: Bytes,
    ended: bool,
}

impl H2Stream {
    pub(crate) fn new(send: h2::SendStream<Bytes>, recv: h2::RecvStream) -> H2Stream {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            ended: false,
        }
    }
}

impl H2Stream {
    /// The stream's two halves, for a relay that moves frames as they are (the encrypted
    /// TCP relay): only before anything was read through this wrapper.
    pub(crate) fn into_parts(self) -> (h2::SendStream<Bytes>, h2::RecvStream) {
        debug_assert!(self.pending.is_empty() && !self.ended, "a fresh stream");
        (self.send, self.recv)
    }
}

/// Waits until the peer's flow-control window has room: how many of `want` bytes may be
/// sent now (a peer that does not read holds the sender here).
pub(crate) fn poll_room(
    send: &mut h2::SendStream<Bytes>,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    send.reserve_capacity(want);
    loop {
        let room = send.capacity();
        if room > 0 {
            return Poll::Ready(Ok(room.min(want)));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }
}

/// A stream error as the relays understand it: a reset by the peer is a reset.
pub(crate) fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
    }
    match e.reason() {
        Some(h2::Reason::CANCEL) | Some(h2::Reason::STREAM_CLOSED) => {
            io::Error::new(io::ErrorKind::ConnectionReset, e)
        }
        _ => io::Error::other(e),
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        while me.pending.is_empty() {
            match ready!(me.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(b)) => me.pending = b,
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
        let n = me.pending.len().min(out.remaining());
        out.put_slice(&me.pending[..n]);
        me.pending.advance(n);
        let _ = me.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let me = self.get_mut();
        let n = ready!(poll_room(&mut me.send, cx, buf.len()))?;
        me.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.ended {
            me.ended = true;
            me.send.reserve_capacity(0);
            me.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client and a server stream of one HTTP/2 connection over an in-memory pipe.
    pub(crate) async fn pair() -> (H2Stream, H2Stream) {
        let (c, s) = tokio::io::duplex(64 << 10);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            // The connection is driven for as long as the test runs.
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            H2Stream::new(send, req.into_body())
        });
        let (send_request, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let mut send_request = send_request.ready().await.unwrap();
        let req = http::Request::connect("10.0.0.1:80").body(()).unwrap();
        let (answer, send) = send_request.send_request(req, false).unwrap();
        let client = H2Stream::new(send, answer.await.unwrap().into_body());
        (client, server.await.unwrap())
    }

    /// Bytes both ways, more than the stream's window; a shutdown is the other side's
    /// EOF while the other direction keeps going (half-close).
    #[tokio::test]
    async fn carries_bytes_both_ways_and_half_closes() {
        let (mut client, mut server) = pair().await;
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "every byte, in order");
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
    }

    /// A stream dropped before it ended is a reset at the other end.
    #[tokio::test]
    async fn dropping_an_unended_stream_resets_it() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"partial").await.unwrap();
        let mut b = [0u8; 7];
        server.read_exact(&mut b).await.unwrap();
        drop(client);
        let mut rest = Vec::new();
        let e = server.read_to_end(&mut rest).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }
}
