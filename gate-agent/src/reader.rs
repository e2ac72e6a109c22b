//! The card reader interface (SPEC §7): local TCP, one JSON line each way.
//!
//! For each `{"tap": {...}}` line the gate decides, makes the record durable, then sends the
//! response line and commands the flaps together. A line that is not a valid request gets a
//! `ReaderError` line (`malformed_request`, or `too_large` past [`MAX_READER_LINE`]); the
//! connection and the agent live on. Requests on one connection are handled in order.

use std::sync::Arc;
use std::time::Duration;

use afc_domain::wire::{self, ReaderError, ReaderRequest, MAX_READER_LINE};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::gate::Gate;
use crate::metrics::Metrics;

/// One line read with a length bound.
enum Line {
    Text(Vec<u8>),
    TooLong,
    Eof,
}

/// Reads up to the next `\n`; past `limit` bytes the rest of the line is discarded.
async fn read_line<R: AsyncRead + Unpin>(r: &mut BufReader<R>, limit: usize) -> std::io::Result<Line> {
    let mut out = Vec::new();
    let mut too_long = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if out.is_empty() && !too_long {
                Line::Eof
            } else if too_long {
                Line::TooLong
            } else {
                Line::Text(out)
            });
        }
        let (chunk, found) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long {
            if out.len() + chunk.len() > limit {
                too_long = true;
                out = Vec::new();
            } else {
                out.extend_from_slice(chunk);
            }
        }
        let consumed = found.unwrap_or(buf.len());
        r.consume(consumed);
        if found.is_some() {
            return Ok(if too_long { Line::TooLong } else { Line::Text(out) });
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
            let mut r = BufReader::new(r);
            loop {
                let line = tokio::select! {
                    () = cancel.cancelled() => break,
                    l = read_line(&mut r, MAX_READER_LINE) => l,
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
                let outcome = match gate.tap(req.tap).await {
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
        let mut r = BufReader::with_capacity(4, &data[..]);
        assert!(matches!(read_line(&mut r, 10).await.unwrap(), Line::Text(t) if t == b"{\"a\":1}"));
        assert!(matches!(read_line(&mut r, 10).await.unwrap(), Line::TooLong));
        assert!(matches!(read_line(&mut r, 10).await.unwrap(), Line::Text(t) if t == b"last"));
        assert!(matches!(read_line(&mut r, 10).await.unwrap(), Line::Eof));
    }
}
