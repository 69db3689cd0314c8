//! What the end-to-end tests share (`mod common;` in tests/serve.rs,
//! tests/gallery.rs, tests/discord.rs, tests/wan.rs, tests/bundled.rs and others): temporary folders, free ports, the
//! `motif` processes under test and a PostgreSQL database of their own.

// Each test file is its own crate and uses only some of these.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub const MOTIF: &str = env!("CARGO_BIN_EXE_motif");

/// The PNG files in `dir`, sorted by name (a clip's frames as
/// `motif generate -o DIR` writes them).
pub fn pngs(dir: &Path) -> Vec<PathBuf> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    names.sort();
    names
}

/// A command that had to be refused before any GPU work (run with
/// `--adapter no-such-gpu`, so reaching the GPU shows in its message): it
/// failed, its message holds each of `expected`, nothing panicked and
/// `output` was not written. `what` names the case in failures.
pub fn assert_refused_before_gpu(
    o: &std::process::Output,
    what: &str,
    expected: &[&str],
    output: &Path,
) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{what} was accepted");
    for want in expected {
        assert!(e.contains(want), "{what}: expected `{want}` in: {e}");
    }
    assert!(!e.contains("no-such-gpu"), "{what}: reached the GPU: {e}");
    assert!(!e.contains("panicked"), "{e}");
    assert!(!output.exists(), "{what} left a file");
}

/// A number no other call returns: the clock in nanoseconds.
pub fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// An empty folder of this test's own, `motif-TESTFILE-NAME-PID-…` in the
/// system's temporary folder (`CARGO_CRATE_NAME` is the test file's name, as
/// this module is compiled into each). The folders stay after the run, for a
/// look after a failure; the first call of a run removes those of earlier
/// runs of the same test file (see [`remove_ended_runs`]).
pub fn temp_dir(name: &str) -> PathBuf {
    static EARLIER_RUNS: std::sync::Once = std::sync::Once::new();
    EARLIER_RUNS.call_once(|| remove_ended_runs(&std::env::temp_dir()));
    let dir = std::env::temp_dir().join(format!(
        "motif-{}-{name}-{}-{}",
        env!("CARGO_CRATE_NAME"),
        std::process::id(),
        unique()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Removes the folders in `parent` that [`temp_dir`] made for this test
/// file in runs whose process has ended (the PID in the name), so that
/// repeated runs leave at most one run's folders. Where there is no /proc
/// (not Linux), no process counts as ended and nothing is removed.
pub fn remove_ended_runs(parent: &Path) {
    let prefix = format!("motif-{}-", env!("CARGO_CRATE_NAME"));
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        // NAME-PID-UNIQUE, where NAME may hold dashes itself.
        let mut fields = rest.rsplit('-');
        let (Some(_), Some(pid)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        let ended =
            Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists();
        if pid != std::process::id() && ended {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `motif ARGS` with the environment of these tests: none of the caller's
/// service settings, plus `env`.
pub fn motif_command(args: &[&str], env: &[(&str, &str)]) -> Command {
    motif_command_at(Path::new(MOTIF), args, env)
}

/// `motif_command` for the binary at `bin` (a copy of the built one).
pub fn motif_command_at(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(bin);
    command
        .args(args)
        .env(
            "XDG_RUNTIME_DIR",
            std::env::var("XDG_RUNTIME_DIR").unwrap_or("/tmp".into()),
        )
        .env_remove("MOTIF_DATABASE_URL")
        .env_remove("MOTIF_SESSION_SECONDS")
        .env_remove("MOTIF_STORE")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("MOTIF_PUBLIC_URL")
        .env_remove("MOTIF_DISCORD_PUBLIC_KEY")
        .env_remove("MOTIF_DISCORD_APPLICATION_ID")
        .env_remove("MOTIF_DISCORD_BOT_TOKEN")
        .env_remove("MOTIF_DISCORD_API_BASE")
        .envs(env.iter().copied());
    command
}

/// A child process killed (SIGKILL) when dropped; its output goes to `log`.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str]) -> Proc {
        Proc::spawn_with_env(name, args, &[])
    }

    pub fn spawn_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let log = std::env::temp_dir().join(format!("{name}-{}.log", unique()));
        let out = std::fs::File::create(&log).unwrap();
        let child = motif_command(args, env)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        eprintln!("{name}: pid {}, log {}", child.id(), log.display());
        Proc {
            child,
            log,
            name: name.to_string(),
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            eprintln!("stopping {}", self.name);
        }
        self.kill();
    }
}

/// `motif serve --data DATA` on a free port of 127.0.0.1, answering its
/// health check.
pub struct Server {
    pub base: String,
    pub proc: Proc,
}

impl Server {
    pub fn start(data: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(data, extra, &[])
    }

    pub fn start_with_env(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec![
            "serve",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            &listen,
        ];
        args.extend_from_slice(extra);
        let proc = Proc::spawn_with_env("motif-serve", &args, env);
        let server = Server {
            base: format!("http://{listen}"),
            proc,
        };
        let start = Instant::now();
        loop {
            if let Ok(r) = ureq::get(&server.url("/api/v1/health")).call() {
                assert_eq!(r.status(), 200);
                return server;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the server did not answer within 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// A fresh database `motif_NAME_PID` on the PostgreSQL of
/// `MOTIF_TEST_DATABASE_URL` for one test, dropped at its end.
pub struct PgDatabase {
    base: String,
    name: String,
    pub url: String,
}

pub fn psql(base: &str, sql: &str) {
    let out = Command::new("psql")
        .args([base, "-q", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql (Debian's postgresql-client) must be installed");
    assert!(
        out.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgDatabase {
    pub fn create(name: &str) -> PgDatabase {
        let base = std::env::var("MOTIF_TEST_DATABASE_URL").unwrap_or_else(|_| {
            panic!(
                "MOTIF_TEST_DATABASE_URL is not set: the PostgreSQL tests need a server \
                 (`bash tools/test.sh` installs and starts one; locally: postgres://USER:PASSWORD@127.0.0.1/DB with CREATEDB)"
            )
        });
        let db = format!("motif_{name}_{}", std::process::id());
        psql(&base, &format!("DROP DATABASE IF EXISTS {db}"));
        psql(&base, &format!("CREATE DATABASE {db}"));
        let (prefix, _) = base.rsplit_once('/').expect("a URL ending in /DATABASE");
        PgDatabase {
            url: format!("{prefix}/{db}"),
            base,
            name: db,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // The tests declare their server and workers after this guard, so
        // they are gone by now.
        let _ = Command::new("psql")
            .args([
                self.base.as_str(),
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

/// `motif admin create-user NAME STORE… [--admin]` with the password on
/// stdin; `store` is `--data DIR` or `--database URL`.
pub fn create_user(store: &[&str], name: &str, password: &str, admin: bool) {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut args = vec!["admin", "create-user", name];
    args.extend_from_slice(store);
    if admin {
        args.push("--admin");
    }
    let mut child = Command::new(MOTIF)
        .args(&args)
        .env_remove("MOTIF_DATABASE_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "create-user: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
