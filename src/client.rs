//! A small blocking HTTP/1.1 client for the control API over its unix socket, used by the
//! `volfs` CLI and `mount.volfs`. One request per connection (`Connection: close`).
//!
//! JSON requests are sent in one write and their answers read whole ([`Client::get`],
//! [`Client::post`]). Large transfers are streamed both ways ([`Client::stream`]): a request
//! body read from any `Read` is sent with chunked transfer encoding, and the answer's body is
//! a `Read` that decodes chunked or `Content-Length` bodies as they arrive, so neither side
//! holds a whole tarball in memory.
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("volfs-mountd is not running (no daemon answers on {0})")]
    NotRunning(PathBuf),
    #[error("talking to volfs-mountd on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("volfs-mountd sent a malformed answer: {0}")]
    Protocol(String),
    /// The daemon refused the request; the message is the daemon's.
    #[error("{message}")]
    Api { status: u16, message: String },
}

pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Client {
            socket: socket.as_ref().to_path_buf(),
            timeout: Duration::from_secs(120),
        }
    }

    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True when a daemon accepts connections on the socket.
    pub fn is_up(&self) -> bool {
        UnixStream::connect(&self.socket).is_ok()
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("GET", path, None)
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call("DELETE", path, None)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.call("POST", path, Some(&body))
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<T, ClientError> {
        let (status, resp) = self.raw(method, path, body)?;
        if (200..300).contains(&status) {
            serde_json::from_slice(&resp).map_err(|e| ClientError::Protocol(format!("{e}")))
        } else {
            let message = serde_json::from_slice::<ErrorBody>(&resp)
                .map(|b| b.error)
                .unwrap_or_else(|_| format!("HTTP {status}: {}", String::from_utf8_lossy(&resp)));
            Err(ClientError::Api { status, message })
        }
    }

    /// A connection to the daemon's socket with this client's timeouts.
    fn connect(&self) -> Result<UnixStream, ClientError> {
        let io = |source| ClientError::Io {
            path: self.socket.clone(),
            source,
        };
        let s = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(self.socket.clone())
            }
            _ => io(e),
        })?;
        s.set_read_timeout(Some(self.timeout)).map_err(io)?;
        s.set_write_timeout(Some(self.timeout)).map_err(io)?;
        Ok(s)
    }

    /// Sends one request and returns the status and body.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let io = |source| ClientError::Io {
            path: self.socket.clone(),
            source,
        };
        let mut s = self.connect()?;
        let body = body.unwrap_or(&[]);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: volfs\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        // One write: a server may answer (and close) before reading a separately sent body.
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        s.write_all(&req).map_err(io)?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).map_err(io)?;
        parse_response(&buf)
    }
}

/// An answer whose body is read as it arrives (see [`Client::stream`]).
pub struct Streamed {
    pub status: u16,
    headers: Vec<(String, String)>,
    body: Box<dyn Read + Send>,
}

impl Streamed {
    /// A header's value (names compared without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Read for Streamed {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.body.read(out)
    }
}

/// Decodes a chunked body; a body that ends before its last chunk is an error.
struct ChunkedReader<R> {
    r: R,
    left: u64,
    done: bool,
}

fn broke_off() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "volfs-mountd broke off the transfer (its log says why)",
    )
}

impl<R: BufRead> ChunkedReader<R> {
    fn line(&mut self) -> std::io::Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(broke_off());
        }
        Ok(l.trim_end().to_string())
    }
}

impl<R: BufRead> Read for ChunkedReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.done || out.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let l = self.line()?;
            let size = l.split(';').next().unwrap_or("").trim();
            self.left = u64::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad chunk size {size:?} from volfs-mountd"),
                )
            })?;
            if self.left == 0 {
                // Trailers, then the empty line.
                while !self.line()?.is_empty() {}
                self.done = true;
                return Ok(0);
            }
        }
        let want = out.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.r.read(&mut out[..want])?;
        if n == 0 {
            return Err(broke_off());
        }
        self.left -= n as u64;
        if self.left == 0 {
            let l = self.line()?;
            if !l.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "chunk without its CRLF from volfs-mountd",
                ));
            }
        }
        Ok(n)
    }
}

/// A `Content-Length` body: shorter is an error.
struct LengthReader<R> {
    r: R,
    left: u64,
}

impl<R: Read> Read for LengthReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 || out.is_empty() {
            return Ok(0);
        }
        let want = out.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.r.read(&mut out[..want])?;
        if n == 0 {
            return Err(broke_off());
        }
        self.left -= n as u64;
        Ok(n)
    }
}

impl Client {
    /// Sends a request whose body (if any) is streamed from `body` with chunked transfer
    /// encoding, and returns the answer with its body still to be read. An answer that is
    /// not 2xx is returned as [`ClientError::Api`] with the daemon's message.
    pub fn stream(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Option<&mut dyn Read>,
    ) -> Result<Streamed, ClientError> {
        let io = |source| ClientError::Io {
            path: self.socket.clone(),
            source,
        };
        let mut s = self.connect()?;
        let framing = if body.is_some() {
            "Transfer-Encoding: chunked"
        } else {
            "Content-Length: 0"
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: volfs\r\nConnection: close\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n"
        );
        let mut sent = s.write_all(head.as_bytes());
        if let (Ok(()), Some(body)) = (&sent, body) {
            let mut buf = vec![0u8; 256 << 10];
            sent = (|| loop {
                let n = match body.read(&mut buf) {
                    Ok(0) => return s.write_all(b"0\r\n\r\n"),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // Not the socket's fault: say so rather than blame the daemon.
                        return Err(std::io::Error::new(
                            e.kind(),
                            format!("reading the data to send: {e}"),
                        ));
                    }
                };
                let mut frame = format!("{n:x}\r\n").into_bytes();
                frame.extend_from_slice(&buf[..n]);
                frame.extend_from_slice(b"\r\n");
                s.write_all(&frame)?;
            })();
        }
        // The daemon may have answered (an error) and stopped reading: its answer says why.
        let mut r = BufReader::new(s);
        let answer = read_head(&mut r);
        let (status, headers) = match (answer, sent) {
            (Ok(h), _) => h,
            (Err(_), Err(e)) => return Err(io(e)),
            (Err(e), Ok(())) => return Err(e),
        };
        let chunked = headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
        });
        let len = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<u64>().ok());
        let body: Box<dyn Read + Send> = if chunked {
            Box::new(ChunkedReader {
                r,
                left: 0,
                done: false,
            })
        } else if let Some(n) = len {
            Box::new(LengthReader { r, left: n })
        } else {
            Box::new(r)
        };
        let mut out = Streamed {
            status,
            headers,
            body,
        };
        if !(200..300).contains(&status) {
            let mut text = Vec::new();
            out.read_to_end(&mut text).map_err(io)?;
            let message = serde_json::from_slice::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or_else(|_| format!("HTTP {status}: {}", String::from_utf8_lossy(&text)));
            return Err(ClientError::Api { status, message });
        }
        Ok(out)
    }
}

/// Reads a status line and headers.
fn read_head(r: &mut impl BufRead) -> Result<(u16, Vec<(String, String)>), ClientError> {
    let bad = |m: &str| ClientError::Protocol(m.to_string());
    let mut line = String::new();
    r.read_line(&mut line)
        .map_err(|e| ClientError::Protocol(format!("reading the answer: {e}")))?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        let n = r
            .read_line(&mut l)
            .map_err(|e| ClientError::Protocol(format!("reading the answer: {e}")))?;
        let l = l.trim_end();
        if n == 0 || l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

fn parse_response(buf: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let bad = |m: &str| ClientError::Protocol(m.to_string());
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| bad("header is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let mut chunked = false;
    let mut len: Option<usize> = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                len = v.parse().ok();
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let rest = &buf[end + 4..];
    let body = if chunked {
        let mut out = Vec::new();
        let mut r = rest;
        loop {
            let nl = r
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("bad chunk"))?;
            let n = usize::from_str_radix(
                std::str::from_utf8(&r[..nl])
                    .map_err(|_| bad("bad chunk size"))?
                    .trim(),
                16,
            )
            .map_err(|_| bad("bad chunk size"))?;
            r = &r[nl + 2..];
            if n == 0 {
                break;
            }
            out.extend_from_slice(r.get(..n).ok_or_else(|| bad("short chunk"))?);
            r = r.get(n + 2..).unwrap_or(&[]);
        }
        out
    } else {
        match len {
            Some(n) => rest.get(..n).ok_or_else(|| bad("short body"))?.to_vec(),
            None => rest.to_vec(),
        }
    };
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"{}"[..]));
        let (s, b) = parse_response(
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((s, b.as_slice()), (404, &b"abc"[..]));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn chunked_bodies_stream_and_truncation_is_an_error() {
        let mut r = ChunkedReader {
            r: &b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"[..],
            left: 0,
            done: false,
        };
        let mut out = String::new();
        r.read_to_string(&mut out).unwrap();
        assert_eq!(out, "abcde");
        let mut r = ChunkedReader {
            r: &b"3\r\nabc\r\n"[..],
            left: 0,
            done: false,
        };
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
        let mut r = LengthReader {
            r: &b"ab"[..],
            left: 3,
        };
        assert!(r.read_to_end(&mut Vec::new()).is_err());
    }
}
