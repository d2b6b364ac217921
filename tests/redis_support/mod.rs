//! A throwaway `redis-server` per test: loopback only, its own temporary
//! directory, stopped on drop (panics included), so tests and benches of a
//! Redis-backed store start the servers they need and leave none behind.
//!
//! The harness speaks RESP itself over a `TcpStream` (`Conn`, about forty
//! lines) instead of using the `redis` crate or `redis-cli`: it must build
//! and work whether or not the crate's Redis support is compiled in, and a
//! typed reply is easier to assert on than a child process's output.
//!
//! The server binary is `redis-server` from `PATH` (Debian's package
//! `redis-server`, which `.ci/run` installs when missing), or the one named
//! by `REDIS_SERVER` (for example a `valkey-server`). A missing binary is a
//! failure, never a skip: a skipped store test proves nothing.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer PING after it is spawned (a loaded
/// CI machine, an AOF to replay).
const START_BOUND: Duration = Duration::from_secs(20);
/// How long a SIGTERM may take before the server is killed.
const STOP_BOUND: Duration = Duration::from_secs(5);
/// Spawns retried when another process took the free port first.
const PORT_ATTEMPTS: usize = 5;

/// What a server is started with; `RedisServer::start()` is the default
/// (no persistence, a primary, not a cluster node).
#[derive(Clone, Debug, Default)]
pub struct Options {
    aof: bool,
    rdb_save: bool,
    replica_of: Option<u16>,
    cluster: bool,
}

impl Options {
    /// Append-only file on, `appendfsync always`: an acknowledged write
    /// survives a SIGKILL.
    pub fn aof(mut self) -> Self {
        self.aof = true;
        self
    }

    /// Redis's default RDB snapshot points (off unless asked).
    pub fn rdb_save(mut self) -> Self {
        self.rdb_save = true;
        self
    }

    /// A replica of `primary` (`replicaof 127.0.0.1 PORT`).
    pub fn replica_of(mut self, primary: &RedisServer) -> Self {
        self.replica_of = Some(primary.port);
        self
    }

    /// `cluster-enabled yes`, its node file `nodes.conf` in the server's
    /// directory and its bus on a second free port (PORT + 10000, Redis's
    /// default, can be out of range for an ephemeral port).
    pub fn cluster(mut self) -> Self {
        self.cluster = true;
        self
    }

    pub fn start(self) -> RedisServer {
        RedisServer::start_with(self)
    }
}

/// One `redis-server` process on 127.0.0.1, in its own temporary directory.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    pid: u32,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A primary with no persistence.
    pub fn start() -> RedisServer {
        Options::default().start()
    }

    pub fn options() -> Options {
        Options::default()
    }

    fn start_with(options: Options) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("refresh-guard-redis-")
            .tempdir()
            .expect("create a temporary directory for redis-server");
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let bus = options.cluster.then(free_port);
            write_config(dir.path(), port, bus, &options);
            // A fresh log per attempt, so a failure reports its own cause.
            let _ = std::fs::remove_file(dir.path().join("redis.log"));
            match spawn(dir.path(), port) {
                Ok(child) => {
                    return RedisServer {
                        port,
                        pid: child.id(),
                        child: Some(child),
                        dir,
                    };
                }
                Err(log) if log.contains("Address already in use") => last_log = log,
                Err(log) => panic!("{log}"),
            }
        }
        panic!("redis-server found no free port in {PORT_ATTEMPTS} attempts:\n{last_log}");
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the running server (of the last one, once stopped).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh connection (one per call keeps a test's commands independent
    /// of kills and restarts).
    pub fn conn(&self) -> Conn {
        Conn::open(self.port).unwrap_or_else(|e| {
            panic!(
                "connect to redis-server on port {}: {e}\n{}",
                self.port,
                self.log_tail()
            )
        })
    }

    /// One command on a fresh connection; an I/O failure panics with the
    /// server's log tail.
    pub fn cmd(&self, args: &[&str]) -> Reply {
        self.conn().cmd(args).unwrap_or_else(|e| {
            panic!(
                "redis {args:?} on port {}: {e}\n{}",
                self.port,
                self.log_tail()
            )
        })
    }

    /// SIGKILL: no shutdown, no final fsync; what the AOF holds is what
    /// `appendfsync always` already wrote.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within a bound.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// The same server again: same port, directory, configuration and data
    /// (stopped first with `stop()` if it is still running).
    pub fn restart(&mut self) {
        self.stop();
        let child = spawn(self.dir.path(), self.port)
            .unwrap_or_else(|log| panic!("restart on port {}: {log}", self.port));
        self.pid = child.id();
        self.child = Some(child);
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The last lines of the server's log (its stdout and stderr).
    pub fn log_tail(&self) -> String {
        log_tail(self.dir.path())
    }

    /// Polls `cond` every 10 ms until it holds; panics naming `what` (and
    /// the log tail) after `bound`.
    pub fn wait_until(&self, what: &str, bound: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + bound;
        while !cond() {
            if Instant::now() > deadline {
                panic!(
                    "redis-server on port {}: {what} not within {bound:?}\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spawns the server on its configuration and waits until it answers
/// PING with PONG; `Err` holds what went wrong and the log tail (the
/// process, if any, is reaped).
fn spawn(dir: &Path, port: u16) -> Result<Child, String> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("redis.log"))
        .map_err(|e| format!("open {}: {e}", dir.join("redis.log").display()))?;
    let err_log = log
        .try_clone()
        .map_err(|e| format!("duplicate the log handle: {e}"))?;
    let binary = std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
    let mut child = match Command::new(&binary)
        .arg(dir.join("redis.conf"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
            "{} not found: the Redis tests need a redis-server (Debian's package \
             `redis-server`: `apt-get install -y --no-install-recommends redis-server`, \
             which .ci/run does when it is missing), or REDIS_SERVER naming one",
            binary.to_string_lossy()
        ),
        Err(e) => return Err(format!("spawn {}: {e}", binary.to_string_lossy())),
    };
    let deadline = Instant::now() + START_BOUND;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "redis-server on port {} exited ({status}) before answering PING\n{}",
                port,
                log_tail(dir)
            ));
        }
        if answers_as(port, child.id()) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            terminate(&mut child);
            return Err(format!(
                "redis-server on port {} did not answer PING within {START_BOUND:?}\n{}",
                port,
                log_tail(dir)
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// PONG to PING, from `pid`: another process's server that took the port
/// first must not pass for ours.
fn answers_as(port: u16, pid: u32) -> bool {
    let Ok(mut conn) = Conn::open(port) else {
        return false;
    };
    if conn.cmd(&["PING"]).ok() != Some(Reply::Simple("PONG".into())) {
        return false;
    }
    let info = conn.cmd(&["INFO", "server"]).ok().and_then(|r| r.text());
    info.is_some_and(|info| info.lines().any(|l| l == format!("process_id:{pid}")))
}

/// A port the kernel just handed out on 127.0.0.1 (free now; the spawn
/// retries if someone takes it before redis-server binds it).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 for a free port")
        .port()
}

fn write_config(dir: &Path, port: u16, bus: Option<u16>, options: &Options) {
    let mut conf = format!(
        "bind 127.0.0.1\nport {port}\nprotected-mode yes\ndaemonize no\nlogfile \"\"\n\
         dir \"{}\"\n",
        dir.display()
    );
    conf.push_str(if options.rdb_save {
        "save 3600 1 300 100 60 10000\n"
    } else {
        "save \"\"\n"
    });
    if options.aof {
        conf.push_str("appendonly yes\nappendfsync always\n");
    }
    if let Some(primary) = options.replica_of {
        conf.push_str(&format!("replicaof 127.0.0.1 {primary}\n"));
    }
    if let Some(bus) = bus {
        conf.push_str(&format!(
            "cluster-enabled yes\ncluster-config-file nodes.conf\ncluster-port {bus}\n"
        ));
    }
    let path: PathBuf = dir.join("redis.conf");
    std::fs::write(&path, conf).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn terminate(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) takes no pointers; `pid` is our own unreaped
        // child, so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_BOUND;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn log_tail(dir: &Path) -> String {
    let mut text = String::new();
    let _ = File::open(dir.join("redis.log")).and_then(|mut f| f.read_to_string(&mut text));
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    format!("--- redis-server log tail ({}) ---\n{tail}", dir.display())
}

/// A RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// A bulk reply as text (`None` for nil or any other kind of reply).
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Reply::Simple(s) => Some(s.clone()),
            _ => None,
        }
    }
}

/// A minimal RESP2 client: commands out as arrays of bulk strings, one
/// reply read back per command.
pub struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(port: u16) -> io::Result<Conn> {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Conn {
            reader: BufReader::new(stream),
        })
    }

    pub fn cmd(&mut self, args: &[&str]) -> io::Result<Reply> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.reader.get_mut().write_all(&out)?;
        read_reply(&mut self.reader)
    }
}

fn read_reply(r: &mut impl BufRead) -> io::Result<Reply> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.strip_suffix("\r\n").ok_or_else(|| bad("no CRLF"))?;
    let (kind, rest) = line.split_at_checked(1).ok_or_else(|| bad("empty line"))?;
    let len = || rest.parse::<i64>().map_err(|_| bad("bad length"));
    Ok(match kind {
        "+" => Reply::Simple(rest.into()),
        "-" => Reply::Error(rest.into()),
        ":" => Reply::Int(len()?),
        "$" => match usize::try_from(len()?) {
            Err(_) => Reply::Bulk(None),
            Ok(n) => {
                let mut buf = vec![0; n + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n);
                Reply::Bulk(Some(buf))
            }
        },
        "*" => match usize::try_from(len()?) {
            Err(_) => Reply::Array(None),
            Ok(n) => Reply::Array(Some(
                (0..n).map(|_| read_reply(r)).collect::<Result<_, _>>()?,
            )),
        },
        _ => return Err(bad("unknown reply type")),
    })
}
