//! The control socket: how `portwatch attach` and `portwatch ports` talk to a running agent,
//! and the single-instance lock.
//!
//! A Unix stream socket at `<runtime-dir>/portwatch.sock`, mode 0600 (0660 with `--group`).
//! Each peer's credentials are checked (SO_PEERCRED): root, or a member of the configured
//! group. The protocol is JSON lines: the client sends one request line, the agent answers
//! with JSON lines. Nothing listens on the network.

pub mod protocol;
pub mod rows;

use nix::fcntl::{Flock, FlockArg};
use std::{
    fs::File,
    io::{Read, Seek, Write},
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use crate::error::{Error, Result};

pub use crate::control::protocol::{
    socket_path, Filter, PortRow, Query, Request, DEFAULT_RUNTIME_DIR,
};

// ---- single instance ----

/// Held for the agent's lifetime: `flock` on `<runtime-dir>/portwatch.pid`, which holds the
/// agent's pid so a second agent can name it.
pub struct InstanceLock {
    _file: Flock<File>,
}

pub fn lock_instance(runtime_dir: &Path) -> Result<InstanceLock> {
    let io = |what: &'static str| move |source| Error::Io { what, source };
    std::fs::create_dir_all(runtime_dir).map_err(io("creating the runtime directory"))?;
    let _ = std::fs::set_permissions(runtime_dir, std::fs::Permissions::from_mode(0o755));
    let path = runtime_dir.join("portwatch.pid");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io("opening the instance lock file"))?;
    let mut f = match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => locked,
        Err((mut f, _)) => {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            return Err(Error::AlreadyRunning {
                pid: s.trim().to_string(),
                lock: path,
            });
        }
    };
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{}", std::process::id());
    Ok(InstanceLock { _file: f })
}

/// The pid in the lock file if an agent holds it.
pub fn running_agent(runtime_dir: &Path) -> Option<String> {
    let path = runtime_dir.join("portwatch.pid");
    let f = File::open(path).ok()?;
    // A shared non-blocking probe, released at once.
    if Flock::lock(f, FlockArg::LockSharedNonblock).is_ok() {
        return None;
    }
    std::fs::read_to_string(runtime_dir.join("portwatch.pid"))
        .ok()
        .map(|s| s.trim().to_string())
}

// ---- server ----

pub fn bind(runtime_dir: &Path, group: Option<u32>) -> Result<UnixListener> {
    let path = socket_path(runtime_dir);
    // We hold the instance lock, so a socket file left here is stale.
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).map_err(|source| Error::Io {
        what: "creating the control socket",
        source,
    })?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        Error::Io {
            what: "setting the control socket's mode",
            source,
        }
    })?;
    if let Some(g) = group {
        // A socket the group cannot reach is no use to it: say so rather than run without.
        std::os::unix::fs::chown(&path, None, Some(g)).map_err(|source| Error::Io {
            what: "giving the control socket to --group",
            source,
        })?;
    }
    Ok(l)
}

/// Is this peer allowed? Root always; with `--group`, members of that group.
fn allowed(cred: &tokio::net::unix::UCred, group: Option<u32>) -> bool {
    if cred.uid() == 0 {
        return true;
    }
    let Some(g) = group else { return false };
    if cred.gid() == g {
        return true;
    }
    // Supplementary groups of the peer process, read from /proc by its pid (the pid comes
    // from the kernel's SO_PEERCRED, not from the peer).
    cred.pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .map(|gs| gs.split_whitespace().any(|x| x.parse() == Ok(g)))
        })
        .unwrap_or(false)
}

/// Clients served at once. Only root or the `--group` may connect, but a member of that
/// group must not be able to exhaust the agent's fds or memory: beyond this, a client is
/// told why and closed.
pub const MAX_CLIENTS: usize = 32;
/// A request is one JSON line of a few fields; anything longer is refused unread.
pub const MAX_REQUEST_BYTES: u64 = 8 * 1024;
/// A client that connects and sends no request within this is closed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve the control socket until the runtime ends. Requests go to the processing thread as
/// `Query`s, on whatever message type its queue carries.
pub async fn serve<M: From<Query> + Send + 'static>(
    listener: UnixListener,
    tx: mpsc::Sender<M>,
    group: Option<u32>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Refused without a task of its own: the write is small and bounded in time.
            tokio::spawn(async move {
                let mut stream = stream;
                let msg = serde_json::json!({"error": format!(
                    "the agent already serves {MAX_CLIENTS} control clients; close one \
                     (e.g. an idle `portwatch attach`) and try again"
                )});
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    stream.write_all(format!("{msg}\n").as_bytes()),
                )
                .await;
            });
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = handle(stream, tx, group).await;
            drop(permit);
        });
    }
}

/// Bytes an attach client is sent per write at most (a few hundred lines).
const ATTACH_BATCH: usize = 64 * 1024;

async fn handle<M: From<Query>>(
    stream: UnixStream,
    tx: mpsc::Sender<M>,
    group: Option<u32>,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (r, mut w) = stream.into_split();
    if !allowed(&cred, group) {
        let msg = serde_json::json!({"error": format!(
            "permission denied: uid {} may not use the portwatch control socket; run as root{}",
            cred.uid(),
            if group.is_some() { " or as a member of the agent's --group" } else { "" }
        )});
        w.write_all(format!("{msg}\n").as_bytes()).await?;
        return Ok(());
    }
    let mut r = BufReader::new(r.take(MAX_REQUEST_BYTES));
    let req = match read_request(&mut r).await {
        Ok(Some(req)) => req,
        Ok(None) => return Ok(()),
        Err(why) => {
            let msg = serde_json::json!({ "error": why }).to_string() + "\n";
            w.write_all(msg.as_bytes()).await?;
            return Ok(());
        }
    };
    match req {
        Request::Attach { filter, since_s } => attach(tx, filter, since_s, r, w).await,
        Request::Ports { filter } => {
            let rows = ask(&tx, |reply| Query::Ports { filter, reply }).await;
            answer(
                &mut w,
                rows.map(|rows| serde_json::json!({ "ports": rows })),
            )
            .await
        }
        Request::Published { port } => {
            let v = ask(&tx, |reply| Query::Published { port, reply }).await;
            answer(&mut w, v.map(|v| serde_json::json!({ "published": v }))).await
        }
        Request::Status => {
            let v = ask(&tx, |reply| Query::Status { reply }).await;
            answer(&mut w, v).await
        }
    }
}

/// One JSON request line, read within REQUEST_TIMEOUT and MAX_REQUEST_BYTES. None: the
/// client hung up; Err: why it is refused.
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::result::Result<Option<Request>, String> {
    let mut line = String::new();
    match tokio::time::timeout(REQUEST_TIMEOUT, r.read_line(&mut line)).await {
        Err(_) => Err(format!(
            "no request within {} s; send one JSON line right after connecting",
            REQUEST_TIMEOUT.as_secs()
        )),
        Ok(Ok(0) | Err(_)) => Ok(None),
        Ok(Ok(n)) if n as u64 >= MAX_REQUEST_BYTES && !line.ends_with('\n') => Err(format!(
            "request too long: at most {MAX_REQUEST_BYTES} bytes in one line ending in \\n"
        )),
        Ok(Ok(_)) => serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| format!("bad request: {e}")),
    }
}

/// Ask the processing thread and wait for its answer; None if it is gone.
async fn ask<M: From<Query>, T>(
    tx: &mpsc::Sender<M>,
    q: impl FnOnce(oneshot::Sender<T>) -> Query,
) -> Option<T> {
    let (reply_tx, reply_rx) = oneshot::channel();
    tx.send(q(reply_tx).into()).await.ok()?;
    reply_rx.await.ok()
}

async fn answer(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    v: Option<serde_json::Value>,
) -> std::io::Result<()> {
    match v {
        Some(v) => w.write_all(format!("{v}\n").as_bytes()).await,
        None => Ok(()),
    }
}

/// `attach`: the replay, then live records until either side hangs up.
async fn attach<M: From<Query>>(
    tx: mpsc::Sender<M>,
    filter: Filter,
    since_s: u64,
    r: BufReader<tokio::io::Take<tokio::net::unix::OwnedReadHalf>>,
    mut w: tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let (live_tx, mut live_rx) = mpsc::channel::<Arc<[u8]>>(4096);
    let Some(replay) = ask(&tx, |replay| Query::Attach {
        filter,
        since_s,
        live: live_tx,
        replay,
    })
    .await
    else {
        return Ok(());
    };
    let mut batch = Vec::with_capacity(ATTACH_BATCH);
    for l in replay {
        batch.extend_from_slice(&l);
        if batch.len() >= ATTACH_BATCH {
            w.write_all(&batch).await?;
            batch.clear();
        }
    }
    w.write_all(&batch).await?;
    // Watch the client's side too: when it hangs up, stop promptly.
    let mut sink = [0u8; 64];
    let mut r = r.into_inner();
    loop {
        tokio::select! {
            l = live_rx.recv() => match l {
                Some(l) => {
                    // One write for whatever is queued, not one per line: a busy
                    // host makes tens of thousands of lines a second per client.
                    batch.clear();
                    batch.extend_from_slice(&l);
                    while batch.len() < ATTACH_BATCH {
                        match live_rx.try_recv() {
                            Ok(l) => batch.extend_from_slice(&l),
                            Err(_) => break,
                        }
                    }
                    w.write_all(&batch).await?;
                }
                None => break,
            },
            n = tokio::io::AsyncReadExt::read(&mut r, &mut sink) => {
                if matches!(n, Ok(0) | Err(_)) { break; }
            }
        }
    }
    Ok(())
}

// ---- client ----

/// Connect to the running agent, or say clearly that none runs.
pub fn connect(runtime_dir: &Path) -> Result<std::os::unix::net::UnixStream> {
    let path = socket_path(runtime_dir);
    std::os::unix::net::UnixStream::connect(&path).map_err(|source| Error::NoAgent { path, source })
}

/// Send a request; return the stream positioned at the first answer line.
pub fn request(
    runtime_dir: &Path,
    req: &Request,
) -> Result<std::io::BufReader<std::os::unix::net::UnixStream>> {
    let mut s = connect(runtime_dir)?;
    let mut line = serde_json::to_vec(req).unwrap_or_default();
    line.push(b'\n');
    // A refusing agent answers and hangs up without reading: the answer is still there to
    // read, so a failed write is not the end.
    let _ = s.write_all(&line);
    Ok(std::io::BufReader::new(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filter_matching() {
        let c = json!({"type":"conflict","port":8080,"actor":{"pid":1,"container":{"name":"web1","id":"99c0b70358a8"}},
                       "holders":[{"pid":2,"port":8080,"container":{"name":"db","id":"aa"}}]});
        let f = |port, pid, container: Option<&str>| Filter {
            port,
            pid,
            container: container.map(String::from),
        };
        assert!(f(None, None, None).matches(&c));
        assert!(f(Some(8080), None, None).matches(&c));
        assert!(!f(Some(8081), None, None).matches(&c));
        assert!(f(None, Some(2), None).matches(&c), "holder pid");
        assert!(!f(None, Some(3), None).matches(&c));
        assert!(f(None, None, Some("web1")).matches(&c));
        assert!(f(None, None, Some("db")).matches(&c), "holder container");
        assert!(f(None, None, Some("99c0")).matches(&c), "id prefix");
        assert!(!f(None, None, Some("cache")).matches(&c));
        assert!(f(Some(1), None, None).matches(&json!({"type":"lost","count":3})));
    }

    #[test]
    fn request_wire_format() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"attach","filter":{"port":8080},"since_s":60}"#)
                .unwrap();
        assert!(matches!(r, Request::Attach { since_s: 60, filter } if filter.port == Some(8080)));
        let r: Request = serde_json::from_str(r#"{"cmd":"ports"}"#).unwrap();
        assert!(matches!(r, Request::Ports { .. }));
    }

    #[test]
    fn second_instance_is_refused_with_the_pid() {
        let d = std::env::temp_dir().join(format!("pw-lock-{}", std::process::id()));
        let a = lock_instance(&d).unwrap();
        assert_eq!(running_agent(&d), Some(std::process::id().to_string()));
        match lock_instance(&d) {
            Err(Error::AlreadyRunning { pid, .. }) => {
                assert_eq!(pid, std::process::id().to_string());
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        drop(a);
        assert_eq!(running_agent(&d), None);
        let _ = std::fs::remove_dir_all(d);
    }
}
