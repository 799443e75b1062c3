//! cpu_ram_efficient_loading: only rank 0 opens the weight files; the other ranks build the
//! model from config.json and receive every value from rank 0.
//!
//! The kernel tells who opens the file: a fanotify mark on the weight file reports the pid of
//! every process that opens it, and the pid's environment says which rank of which job it is.
//! fanotify needs CAP_SYS_ADMIN; without it the test says why and returns.

mod support;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ff_config::{FsdpConfig, ShardingStrategy};
use support::{assert_success, fixture_config, Job, JOB_VAR};

/// Watches one file and records which ranks of job `job_id` open it.
struct OpenWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<BTreeSet<String>>,
}

impl OpenWatch {
    fn start(file: &Path, job_id: &str) -> Result<Self, String> {
        // SAFETY: plain system calls; the returned descriptor is owned below.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK,
                (libc::O_RDONLY | libc::O_LARGEFILE) as u32,
            )
        };
        if fd < 0 {
            return Err(format!(
                "fanotify_init failed ({}); it needs CAP_SYS_ADMIN",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let path = CString::new(file.as_os_str().as_bytes()).unwrap();
        // SAFETY: path is a valid C string; fd is a fanotify descriptor.
        let marked = unsafe {
            libc::fanotify_mark(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::FAN_MARK_ADD,
                libc::FAN_OPEN,
                libc::AT_FDCWD,
                path.as_ptr(),
            )
        };
        if marked < 0 {
            return Err(format!(
                "fanotify_mark failed ({})",
                std::io::Error::last_os_error()
            ));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let marker = format!("{JOB_VAR}={job_id}");
        let thread = std::thread::spawn(move || {
            let mut ranks = BTreeSet::new();
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // SAFETY: buf is writable for its whole length.
                let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    if stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                let mut offset = 0;
                while offset < n as usize {
                    // SAFETY: the kernel wrote whole event records into buf.
                    let event: libc::fanotify_event_metadata =
                        unsafe { std::ptr::read_unaligned(buf[offset..].as_ptr().cast()) };
                    if event.fd >= 0 {
                        // SAFETY: each event carries a descriptor that the reader must close.
                        unsafe { libc::close(event.fd) };
                    }
                    let environ =
                        std::fs::read(format!("/proc/{}/environ", event.pid)).unwrap_or_default();
                    let vars: Vec<String> = environ
                        .split(|&b| b == 0)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .collect();
                    if vars.contains(&marker) {
                        let rank = vars
                            .iter()
                            .find_map(|v| v.strip_prefix("RANK="))
                            .unwrap_or("launcher")
                            .to_string();
                        ranks.insert(rank);
                    }
                    offset += event.event_len as usize;
                }
            }
            ranks
        });
        Ok(Self { stop, thread })
    }

    fn finish(self) -> BTreeSet<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

/// Which ranks open the weight file in a 2-process FULL_SHARD run with `efficient` loading.
fn ranks_opening_weights(efficient: bool) -> Option<BTreeSet<String>> {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::new(dir.path());
    let config = fixture_config(dir.path(), "");
    let weights = support::root().join("testdata/tiny-llama/model.safetensors");
    let watch = match OpenWatch::start(&weights, &job.id) {
        Ok(watch) => watch,
        Err(reason) => {
            println!("skipped: {reason}");
            return None;
        }
    };
    let settings = FsdpConfig {
        cpu_ram_efficient_loading: efficient,
        sync_module_states: true,
        sharding_strategy: ShardingStrategy::FullShard,
        ..FsdpConfig::default()
    }
    .to_env_value();
    let finished = job
        .train(
            "two",
            &config,
            &["output_dir=out", "per_device_train_batch_size=1"],
            &[
                ("FORCE_TORCHRUN", "1"),
                ("NPROC_PER_NODE", "2"),
                (ff_config::FSDP_ENV_VAR, settings.as_str()),
            ],
        )
        .wait_until(Instant::now() + Duration::from_secs(240));
    assert_success(&finished);
    Some(watch.finish())
}

#[test]
fn only_rank_0_reads_the_weight_files_with_cpu_ram_efficient_loading() {
    let Some(efficient) = ranks_opening_weights(true) else {
        return;
    };
    assert_eq!(
        efficient,
        BTreeSet::from(["0".to_string()]),
        "with cpu_ram_efficient_loading only rank 0 opens model.safetensors"
    );
    // The watch does see other ranks when they do read: without the setting both ranks open it.
    let plain = ranks_opening_weights(false).expect("fanotify worked a moment ago");
    assert_eq!(
        plain,
        BTreeSet::from(["0".to_string(), "1".to_string()]),
        "without cpu_ram_efficient_loading every rank opens model.safetensors"
    );
}
