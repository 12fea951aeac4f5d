//! The `/metrics` endpoint: a small HTTP/1.x server on a thread of its own.
//! One request per connection (`Connection: close`), request head bounded
//! (8 KiB, 5 s), so a slow or hostile scraper holds nothing for long.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// What is served at `/metrics`, rendered at each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

const HEAD_LIMIT: usize = 8 * 1024;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct MetricsServer {
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Listens on `addr` and serves `render()` at `GET /metrics`.
    pub fn start(addr: SocketAddr, render: Render) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (l2, s2) = (listener.try_clone()?, stop.clone());
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for c in l2.incoming() {
                    if s2.load(SeqCst) {
                        break;
                    }
                    if let Ok(c) = c {
                        if let Err(e) = answer(c, &render) {
                            debug!("metrics: {e}");
                        }
                    }
                }
            })?;
        info!("metrics on http://{addr}/metrics");
        Ok(MetricsServer {
            listener,
            stop,
            thread: Some(thread),
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, SeqCst);
        // shutdown(2) on the listening socket wakes the blocked accept(2).
        let _ = socket2::SockRef::from(&self.listener).shutdown(Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Reads one request head and answers it.
fn answer(mut c: TcpStream, render: &Render) -> io::Result<()> {
    c.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    c.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() > HEAD_LIMIT {
            return reply(
                &mut c,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
            );
        }
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render();
            let body = if method == "HEAD" {
                String::new()
            } else {
                body
            };
            reply(
                &mut c,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
        }
        ("GET" | "HEAD", _) => reply(
            &mut c,
            "404 Not Found",
            "text/plain",
            "only /metrics is here\n",
        ),
        _ => reply(
            &mut c,
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n",
        ),
    }
}

fn reply(c: &mut TcpStream, status: &str, kind: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes())?;
    c.write_all(body.as_bytes())?;
    let _ = c.shutdown(Shutdown::Write);
    Ok(())
}
