//! The card reader interface (SPEC §7): local TCP, one JSON line each way.
//!
//! For each `{"tap": {...}}` line the gate decides, makes the record durable, then sends the
//! response line and commands the flaps together. A line that is not a valid request gets a
//! `ReaderError` line (`malformed_request`, or `too_large` past [`MAX_READER_LINE`]); the
//! connection and the agent live on. Requests on one connection are handled in order.
//!
//! A request with `"psam": true` comes from a reader holding a PSAM: when the gate accepts a
//! stored-value tap that writes the card it sends a `sign` line on the same connection and reads
//! the reader's `signed` (or `psam_error`) line before it records and answers ([`ReaderPsam`];
//! the wait is bounded by the gate). A `signed` or `psam_error` line arriving late, after the gate
//! gave up waiting, is dropped and counted (`afc_gate_psam_signatures_total{outcome="late"}`),
//! never taken as a request.

use std::sync::Arc;
use std::time::Duration;

use afc_domain::ledger::TacRef;
use afc_domain::tac::TacInput;
use afc_domain::wire::{self, PsamReply, PsamSignRequest, ReaderError, ReaderRequest, MAX_READER_LINE};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::gate::{Gate, Psam, PsamFault};
use crate::metrics::Metrics;

/// One line read with a length bound.
enum Line {
    Text(Vec<u8>),
    TooLong,
    Eof,
}

/// The lines of one reader connection, each bounded to `limit` bytes (past it the rest of the line
/// is discarded).
///
/// Cancel-safe: the part of a line read so far is kept here, not in the future, so a `next` that
/// is dropped mid-line (the gate's PSAM wait timing out while the answer is half received) loses
/// nothing, and the next call returns the whole line.
struct LineReader<R> {
    r: BufReader<R>,
    limit: usize,
    partial: Vec<u8>,
    too_long: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(r: BufReader<R>, limit: usize) -> LineReader<R> {
        LineReader { r, limit, partial: Vec::new(), too_long: false }
    }

    /// Reads up to the next `\n`.
    async fn next(&mut self) -> std::io::Result<Line> {
        loop {
            let buf = self.r.fill_buf().await?;
            if buf.is_empty() {
                let out = std::mem::take(&mut self.partial);
                return Ok(if std::mem::take(&mut self.too_long) {
                    Line::TooLong
                } else if out.is_empty() {
                    Line::Eof
                } else {
                    Line::Text(out)
                });
            }
            let (chunk, found) = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (&buf[..i], Some(i + 1)),
                None => (buf, None),
            };
            if !self.too_long {
                if self.partial.len() + chunk.len() > self.limit {
                    self.too_long = true;
                    self.partial = Vec::new();
                } else {
                    self.partial.extend_from_slice(chunk);
                }
            }
            // No await between keeping the bytes and consuming them: a drop here loses nothing.
            let consumed = found.unwrap_or(buf.len());
            self.r.consume(consumed);
            if found.is_some() {
                let out = std::mem::take(&mut self.partial);
                return Ok(if std::mem::take(&mut self.too_long) { Line::TooLong } else { Line::Text(out) });
            }
        }
    }
}

/// The PSAM of the reader at the other end of one connection: a `sign` line out, one line back.
/// The gate bounds the wait; an answer it stopped waiting for, even one cut off mid-line, is read
/// whole by the connection's next read (the [`LineReader`] keeps the part received) and dropped
/// there as late.
struct ReaderPsam<'a, R, W> {
    r: &'a mut LineReader<R>,
    w: &'a mut W,
}

impl<R, W> Psam for ReaderPsam<'_, R, W>
where
    R: AsyncRead + Unpin + Send,
    W: tokio::io::AsyncWrite + Unpin + Send,
{
    async fn sign(&mut self, input: &TacInput) -> Result<TacRef, PsamFault> {
        let line = wire::encode_line(&PsamSignRequest { sign: input.clone() });
        self.w.write_all(&line).await.map_err(|e| PsamFault(format!("sending the sign line: {e}")))?;
        let answer = loop {
            match self.r.next().await {
                Ok(Line::Text(t)) if t.iter().all(|b| b.is_ascii_whitespace()) => continue,
                Ok(Line::Text(t)) => break t,
                Ok(Line::TooLong) => return Err(PsamFault("answer over the line limit".into())),
                Ok(Line::Eof) => return Err(PsamFault("reader closed the connection".into())),
                Err(e) => return Err(PsamFault(format!("reading the answer: {e}"))),
            }
        };
        match wire::decode_with_limit::<PsamReply>(&answer, MAX_READER_LINE) {
            Ok(PsamReply::Signed(tac)) => Ok(tac),
            Ok(PsamReply::PsamError(e)) => Err(PsamFault(format!("PSAM error {}: {}", e.code, e.message))),
            Err(e) => Err(PsamFault(format!("not a PSAM answer: {e}"))),
        }
    }
}

/// Serves reader connections on `listener` until `cancel` fires, then waits for its connections
/// to end: a tap being decided is finished (its record durable, its answer sent) before it returns.
pub async fn serve(listener: TcpListener, gate: Arc<Gate>, metrics: Arc<Metrics>, cancel: CancellationToken) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "reader accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tracing::info!(%peer, "reader connected");
        let gate = gate.clone();
        let metrics = metrics.clone();
        let cancel = cancel.clone();
        connections.spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut r = LineReader::new(BufReader::new(r), MAX_READER_LINE);
            loop {
                let line = tokio::select! {
                    () = cancel.cancelled() => break,
                    l = r.next() => l,
                };
                let line = match line {
                    Ok(Line::Text(t)) => t,
                    Ok(Line::Eof) => break,
                    Ok(Line::TooLong) => {
                        metrics.malformed("reader");
                        let e = ReaderError::new(
                            ReaderError::TOO_LARGE,
                            format!("line over {MAX_READER_LINE} bytes"),
                        );
                        if w.write_all(&wire::encode_line(&e)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "reader connection failed");
                        break;
                    }
                };
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                let req: ReaderRequest = match wire::decode_with_limit(&line, MAX_READER_LINE) {
                    Ok(r) => r,
                    // A PSAM answer the gate stopped waiting for: nobody expects a reply to it.
                    Err(_) if wire::decode_with_limit::<PsamReply>(&line, MAX_READER_LINE).is_ok() => {
                        metrics.psam("late");
                        tracing::warn!(%peer, "a PSAM answer arrived after the gate stopped waiting: dropped");
                        continue;
                    }
                    Err(e) => {
                        metrics.malformed("reader");
                        tracing::warn!(%peer, error = %e, "malformed reader line");
                        let e = ReaderError::new(ReaderError::MALFORMED_REQUEST, e.to_string());
                        if w.write_all(&wire::encode_line(&e)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                };
                let tapped = if req.psam {
                    gate.tap_with(req.tap, Some(&mut ReaderPsam { r: &mut r, w: &mut w })).await
                } else {
                    gate.tap(req.tap).await
                };
                let outcome = match tapped {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::error!(error = %e, "tap could not be recorded");
                        let e = ReaderError::new(ReaderError::UNAVAILABLE, e.to_string());
                        if w.write_all(&wire::encode_line(&e)).await.is_err() {
                            break;
                        }
                        continue;
                    }
                };
                let answer = wire::encode_line(&outcome.response);
                let (written, ()) = tokio::join!(w.write_all(&answer), gate.run_flap(&outcome));
                if written.is_err() {
                    break;
                }
            }
            tracing::info!(%peer, "reader disconnected");
        });
    }
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_split_bounded_and_the_rest_of_a_long_line_is_skipped() {
        let data = b"{\"a\":1}\nxxxxxxxxxxxxxxxxxxxx\nlast".to_vec();
        let mut r = LineReader::new(BufReader::with_capacity(4, &data[..]), 10);
        assert!(matches!(r.next().await.unwrap(), Line::Text(t) if t == b"{\"a\":1}"));
        assert!(matches!(r.next().await.unwrap(), Line::TooLong));
        assert!(matches!(r.next().await.unwrap(), Line::Text(t) if t == b"last"));
        assert!(matches!(r.next().await.unwrap(), Line::Eof));
    }

    #[tokio::test]
    async fn a_read_dropped_mid_line_loses_nothing_and_the_next_read_returns_the_whole_line() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut r = LineReader::new(BufReader::new(rx), 100);
        tx.write_all(b"{\"signed\":").await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(50), r.next()).await;
        assert!(waited.is_err(), "no line yet");
        tx.write_all(b"1}\nnext\n").await.unwrap();
        assert!(matches!(r.next().await.unwrap(), Line::Text(t) if t == b"{\"signed\":1}"));
        assert!(matches!(r.next().await.unwrap(), Line::Text(t) if t == b"next"));
        // The same with a line that grows past the limit across the drop.
        tx.write_all(&[b'x'; 60]).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(50), r.next()).await.is_err());
        tx.write_all(&[b'x'; 60]).await.unwrap();
        tx.write_all(b"\nlast\n").await.unwrap();
        assert!(matches!(r.next().await.unwrap(), Line::TooLong));
        assert!(matches!(r.next().await.unwrap(), Line::Text(t) if t == b"last"));
    }
}
