//! Running `ferrofactory train` as multi-process jobs in tests: the tiny fixture config, nodes
//! started as child processes with their output in files, deadlines, and a check that a job
//! left no process behind.
//!
//! Every process of a job carries [`JOB_VAR`] with a value unique to the job (workers inherit
//! it from their launcher), so the job's processes can be found in /proc whoever their parent
//! is, and a [`Job`] kills any that remain when it is dropped, also when a test fails.

// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Marks every process of one test job.
pub const JOB_VAR: &str = "FERROFACTORY_TEST_JOB";

/// Launch variables the tests set themselves; values inherited from the caller would change
/// what the jobs do.
const LAUNCH_VARS: &[&str] = &[
    "FORCE_TORCHRUN",
    "NNODES",
    "NODE_RANK",
    "RANK",
    "NPROC_PER_NODE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GLOO_SOCKET_IFNAME",
    "FERROFACTORY_LAUNCHED",
    "FERROFACTORY_RDZV_TIMEOUT",
];

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A config that trains the tiny fixture from its initial adapter on a dataset whose one
/// batch is the reference batch (the same one train_cli.rs uses).
pub fn fixture_config(dir: &Path, extra: &str) -> PathBuf {
    let root = root();
    let yaml = format!(
        "model_name_or_path: {model}\nadapter_name_or_path: {adapter}\nstage: sft\nfinetuning_type: lora\n\
         dataset: fixture_batch\ndataset_dir: {data}\ntemplate: empty\ncutoff_len: 64\n\
         output_dir: {out}\nlogging_steps: 1\nsave_steps: 100\nper_device_train_batch_size: 2\n\
         learning_rate: 1.0e-2\nlr_scheduler_type: constant\nmax_steps: 5\nmax_grad_norm: 1.0\n\
         preprocessing_num_workers: 4\n{extra}",
        model = root.join("testdata/tiny-llama").display(),
        adapter = root.join("testdata/tiny-llama-lora-init").display(),
        data = root.join("testdata/cli").display(),
        out = dir.join("out").display(),
    );
    let path = dir.join("train.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// The losses in `out/trainer_log.jsonl`, one per logged step.
pub fn logged_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("trainer_log.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["loss"].as_f64())
        .collect()
}

/// Largest absolute difference between the float32 tensors of two safetensors files, which
/// must hold the same names and shapes.
pub fn largest_difference(a: &Path, b: &Path) -> f32 {
    let read = |path: &Path| -> Vec<(String, Vec<f32>)> {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out: Vec<(String, Vec<f32>)> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let data = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                (name, data)
            })
            .collect();
        out.sort_by(|x, y| x.0.cmp(&y.0));
        out
    };
    let (ta, tb) = (read(a), read(b));
    assert_eq!(ta.len(), tb.len(), "{} vs {}", a.display(), b.display());
    ta.iter()
        .zip(&tb)
        .flat_map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            assert_eq!(va.len(), vb.len(), "{na}");
            va.iter().zip(vb).map(|(x, y)| (x - y).abs())
        })
        .fold(0f32, f32::max)
}

/// The numbers of each `fsdp rank R: …` report a sharded run prints, in order: rank, parameter
/// bytes held, model bytes, optimizer bytes, largest unit, peak gathered, peak RSS, quantized
/// bytes held, model quantized bytes. A report is one write ending its line, but it may land in
/// the middle of a line another rank was printing, so it is looked for anywhere in a line.
pub fn fsdp_reports(stderr: &str) -> Vec<Vec<u64>> {
    stderr
        .lines()
        .filter_map(|l| l.find("fsdp rank ").map(|at| &l[at..]))
        .map(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().unwrap())
                .collect()
        })
        .collect()
}

/// A port nothing listens on right now (the OS picks it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The processes of one test job; dropping it SIGKILLs any that are still there.
pub struct Job {
    pub id: String,
    dir: PathBuf,
}

impl Job {
    /// A job whose logs go to `dir`.
    pub fn new(dir: &Path) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        Self {
            id: format!(
                "{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::SeqCst)
            ),
            dir: dir.to_path_buf(),
        }
    }

    /// A `ferrofactory` command that belongs to this job, with no launch variables but `env`.
    pub fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        self.wrapped_command(&[], args, env)
    }

    /// [`Job::command`] run through `wrapper` (e.g. `ip netns exec NAME`), which must pass its
    /// environment on.
    pub fn wrapped_command(
        &self,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Command {
        let binary = env!("CARGO_BIN_EXE_ferrofactory");
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command.args(args).current_dir(&self.dir);
        for var in LAUNCH_VARS {
            command.env_remove(var);
        }
        command.env(JOB_VAR, &self.id).envs(env.iter().copied());
        command
    }

    /// Starts `command` as `name`, its output going to `name.out` and `name.err` in the job's
    /// folder (a pipe nobody reads could block it).
    pub fn spawn(&self, name: &str, mut command: Command) -> Node {
        let stdout = self.dir.join(format!("{name}.out"));
        let stderr = self.dir.join(format!("{name}.err"));
        command
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        Node {
            name: name.to_string(),
            child: command.spawn().expect("ferrofactory starts"),
            stdout,
            stderr,
        }
    }

    /// Starts `ferrofactory train config overrides…` with `env`.
    pub fn train(
        &self,
        name: &str,
        config: &Path,
        overrides: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let mut args = vec!["train", config.to_str().unwrap()];
        args.extend_from_slice(overrides);
        self.spawn(name, self.command(&args, env))
    }

    /// The live processes of this job, each with its environment.
    pub fn processes(&self) -> Vec<JobProcess> {
        let marker = format!("{JOB_VAR}={}", self.id);
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| process_alive(pid))
            .filter_map(|pid| {
                let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
                let env: Vec<String> = environ
                    .split(|&b| b == 0)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .collect();
                env.contains(&marker).then_some(JobProcess { pid, env })
            })
            .collect()
    }

    /// Polls for a worker of this job with global rank `rank` until `limit` passes.
    pub fn await_worker(&self, rank: usize, limit: Duration) -> JobProcess {
        let start = Instant::now();
        loop {
            if let Some(worker) = self.processes().into_iter().find(|p| {
                p.var("FERROFACTORY_LAUNCHED") == Some("1")
                    && p.var("RANK") == Some(&rank.to_string())
            }) {
                return worker;
            }
            assert!(
                start.elapsed() < limit,
                "no worker with rank {rank} appeared within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asserts that no process of this job is left, giving stragglers `grace` to go.
    pub fn assert_no_survivors(&self, grace: Duration) {
        let start = Instant::now();
        loop {
            let left: Vec<i32> = self.processes().iter().map(|p| p.pid).collect();
            if left.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < grace,
                "processes {left:?} of the job survived it"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for process in self.processes() {
            signal(process.pid, "KILL");
        }
    }
}

pub struct JobProcess {
    pub pid: i32,
    env: Vec<String>,
}

impl JobProcess {
    /// The value of `var` in the process's environment.
    pub fn var(&self, var: &str) -> Option<&str> {
        self.env
            .iter()
            .find_map(|entry| entry.strip_prefix(var)?.strip_prefix('='))
    }
}

/// A started `ferrofactory` process; dropping it kills it if it was not waited for.
pub struct Node {
    pub name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

pub struct Finished {
    pub name: String,
    pub status: ExitStatus,
    /// When it exited, as seen by the polling wait.
    pub at: Instant,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// The last line of its standard error: the error a failing command reports.
    pub fn last_error_line(&self) -> &str {
        self.stderr.trim_end().lines().last().unwrap_or("")
    }
}

impl Node {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits for it to exit; if it has not by `deadline`, it is killed and the test fails.
    pub fn wait_until(mut self, deadline: Instant) -> Finished {
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not exit in time; its stderr:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Finished {
            name: self.name.clone(),
            status,
            at: Instant::now(),
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Asserts that `finished` succeeded, showing its output otherwise.
pub fn assert_success(finished: &Finished) {
    assert!(
        finished.status.success(),
        "{} exited with {:?}; stderr:\n{}",
        finished.name,
        finished.status,
        finished.stderr
    );
}

/// Asserts that `finished` failed with exit code `code` and no panic.
pub fn assert_failed_with(finished: &Finished, code: i32) {
    assert_eq!(
        finished.status.code(),
        Some(code),
        "{} exit status; stderr:\n{}",
        finished.name,
        finished.stderr
    );
    assert!(
        !finished.stderr.contains("panicked"),
        "{} panicked:\n{}",
        finished.name,
        finished.stderr
    );
}

/// Polls until `out/trainer_log.jsonl` holds `steps` lines: training is under way.
pub fn await_logged_steps(out: &Path, steps: usize, limit: Duration) {
    let start = Instant::now();
    while logged_losses(out).len() < steps {
        assert!(
            start.elapsed() < limit,
            "training did not log {steps} steps within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends the signal named `signal` ("KILL", "TERM", ...) to `pid` with kill(1).
pub fn signal(pid: i32, signal: &str) {
    let _ = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Whether `pid` exists and is not a zombie.
fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}
