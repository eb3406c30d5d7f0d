//! Signals and parent death, as the Python API server behaves (shoal/api/server.py):
//!
//! - the first SIGTERM / SIGINT sets the `draining` watch to true: before serving, start-up
//!   stops at once; while serving, the HTTP layer stops accepting and lets open requests run,
//!   and `main` fails what is left after `--shutdown-timeout` seconds, then exits 0;
//! - a second signal exits at once (status 1);
//! - parent death: PR_SET_PDEATHSIG(SIGTERM) is armed at start (the manager armed SIGKILL
//!   before exec; this replaces it with a signal we can see) and a watcher thread compares
//!   getppid() with the parent at start every 200 ms; either way the process exits at once
//!   (status 1), without draining: the launcher that would collect it is gone.
//!
//! Immediate exits unlink the files registered with `remove_at_exit` (IPC sockets).

use std::sync::Mutex;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;


static EXIT_FILES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static PARENT_AT_START: Mutex<Option<libc::pid_t>> = Mutex::new(None);

/// Remove `path` when the process exits at once (a second signal, parent death).
pub fn remove_at_exit(path: &str) {
    EXIT_FILES.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_string());
}

/// Unlink the registered files and exit with `status` now (no drain, no destructors).
pub fn exit_now(status: i32) -> ! {
    let files = std::mem::take(&mut *EXIT_FILES.lock().unwrap_or_else(|e| e.into_inner()));
    for path in files {
        let _ = std::fs::remove_file(path);
    }
    std::process::exit(status)
}

/// Arm parent-death detection: PR_SET_PDEATHSIG(SIGTERM) plus a watcher thread. `Err` when
/// the parent is already gone (re-parented to init before we got here).
pub fn arm_parent_death() -> Result<(), String> {
    // SAFETY: plain syscalls without pointers.
    let parent = unsafe { libc::getppid() };
    let armed = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) };
    if armed != 0 {
        log_warn!("prctl(PR_SET_PDEATHSIG): {}", std::io::Error::last_os_error());
    }
    // The parent may have died before the prctl: then no signal will ever come.
    if parent == 1 || unsafe { libc::getppid() } != parent {
        return Err("the parent process exited before start-up".to_string());
    }
    *PARENT_AT_START.lock().unwrap_or_else(|e| e.into_inner()) = Some(parent);
    std::thread::Builder::new()
        .name("parent-watch".to_string())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(200));
            if parent_gone() {
                log_error!("the parent process (pid {parent}) exited: exiting");
                exit_now(1);
            }
        })
        .map_err(|e| format!("could not start the parent watcher: {e}"))?;
    Ok(())
}

/// Whether the parent recorded at start is gone (we were re-parented).
fn parent_gone() -> bool {
    match *PARENT_AT_START.lock().unwrap_or_else(|e| e.into_inner()) {
        // SAFETY: plain syscall.
        Some(parent) => (unsafe { libc::getppid() }) != parent,
        None => false,
    }
}

/// The shutdown signal: `false` while serving, `true` once draining.
pub struct Lifecycle {
    draining: watch::Receiver<bool>,
}

impl Lifecycle {
    /// Install the SIGTERM / SIGINT handlers (inside the tokio runtime).
    pub fn install() -> Result<Lifecycle, String> {
        let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM handler: {e}"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT handler: {e}"))?;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let mut received = 0;
            loop {
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                if parent_gone() {
                    // PR_SET_PDEATHSIG's SIGTERM: the launcher is gone, nobody waits for a drain.
                    log_error!("the parent process exited ({name}): exiting");
                    exit_now(1);
                }
                received += 1;
                if received > 1 {
                    log_warn!("{name} again: exiting now");
                    exit_now(1);
                }
                log_info!("{name} received: shutting down");
                let _ = tx.send(true);
            }
        });
        Ok(Lifecycle { draining: rx })
    }

    /// A receiver of the draining flag (for the HTTP layer).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.draining.clone()
    }

    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Resolves once the first signal came.
    pub async fn draining(&self) {
        let mut rx = self.draining.clone();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                // The signal task is gone: never drains (pending forever).
                std::future::pending::<()>().await;
            }
        }
    }
}
