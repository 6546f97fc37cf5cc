//! The TCP connection-rate tool (workload 4), run as `xtask bench __conn-server PORT`
//! inside a container and `xtask bench __conn-client ADDR:PORT SECONDS THREADS` in wan:
//! connect, one byte each way, close; count completed connections per second.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Accepts forever (bounded: exits after an hour) on `addr` (`0.0.0.0`, or `::` for
/// the IPv6 workload): read 1 byte, write it back, wait for the client's close. Four
/// accepting threads.
pub fn server(addr: &str, port: u16) -> anyhow::Result<()> {
    let l = TcpListener::bind((addr, port)).with_context(|| format!("bind {addr} :{port}"))?;
    for _ in 0..4 {
        let l = l.try_clone()?;
        std::thread::spawn(move || {
            loop {
                let Ok((mut s, _)) = l.accept() else { continue };
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok() {
                    // Let the client close first (its side keeps TIME_WAIT).
                    let mut rest = [0u8; 16];
                    let _ = s.read(&mut rest);
                }
            }
        });
    }
    println!("listening on :{port}");
    std::thread::sleep(Duration::from_secs(3600));
    Ok(())
}

fn one(addr: &SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(addr, Duration::from_secs(1))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

/// Runs `threads` sequential connect/1-byte/close loops for `secs`; prints
/// `conns=N errors=E secs=S rate=R`.
pub fn client(addr: &str, secs: f64, threads: usize) -> anyhow::Result<()> {
    let addr: SocketAddr = addr.parse().with_context(|| format!("address {addr}"))?;
    let ok = Arc::new(AtomicU64::new(0));
    let err = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let hs: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (ok, err) = (ok.clone(), err.clone());
            std::thread::spawn(move || {
                while Instant::now() < deadline {
                    match one(&addr) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(1));
                            err.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for h in hs {
        let _ = h.join();
    }
    let el = start.elapsed().as_secs_f64();
    let n = ok.load(Ordering::Relaxed);
    println!(
        "conns={n} errors={} secs={el:.3} rate={:.1}",
        err.load(Ordering::Relaxed),
        n as f64 / el
    );
    Ok(())
}
