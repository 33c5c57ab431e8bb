//! Benchmark for the "preloaded worker" issue: what a job costs when forked
//! from the worker (Django already set up) versus a fresh `python manage.py`
//! subprocess (the published runner's way), on the demo project. Forking
//! comes in two modes: on a spare forked ahead of time (the default) and on
//! demand when the job comes (`prefork = false`); they take turns job by job.
//!
//! * Time: `noop` run repeatedly, from the `spawn_job` call to the job's end
//!   with both pipes read to EOF, i.e. what a caller waits for.
//! * Memory: 8 concurrent `sleep 30` jobs, total PSS of every process
//!   involved. PSS splits shared pages among the processes that share them,
//!   so the sum is the real footprint, copy-on-write sharing included.
//!
//! Prints Markdown tables on stdout (progress goes to stderr), which
//! `bench/worker.sh` records in docs/benchmarks.md.
//!
//! Knobs: `BENCH_RUNS` (timed runs per mode, default 200) and `BENCH_PYTHON`
//! (default `<repo>/.venv/bin/python`, which needs Django).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use dcsupervisor::worker::{Isolation, Output, Stop, Worker, WorkerInfo, WorkerOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::unix::pipe;

/// Untimed runs first, so page cache, `.pyc` files and the worker's first
/// fork do not count.
const WARMUP_RUNS: usize = 5;
/// Concurrent jobs for the memory comparison.
const CONCURRENT_JOBS: usize = 8;
const SLEEP_ARGS: [&str; 1] = ["30"];

/// What one mode measured.
struct Measured {
    label: &'static str,
    samples: Vec<Duration>,
    processes: String,
    pss_kib: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it, where minutes of measuring would only slow the tests.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("worker_overhead: skipped (run it with `cargo bench --bench worker_overhead`)");
        return Ok(());
    }
    let runs: usize = match std::env::var("BENCH_RUNS") {
        Ok(value) => value.parse().context("BENCH_RUNS must be a number")?,
        Err(_) => 200,
    };
    ensure!(runs > 0, "BENCH_RUNS must be at least 1");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python =
        std::env::var_os("BENCH_PYTHON").map_or_else(|| repo.join(".venv/bin/python"), PathBuf::from);
    // A private SQLite path, as the tests do, so the demo's own db is untouched.
    let db = tempfile::tempdir()?;
    let opts = |isolation, prefork| WorkerOptions {
        python: python.clone(),
        project_dir: repo.join("examples/demo"),
        settings_module: "demo_project.settings".into(),
        env: BTreeMap::from([("DEMO_DB_PATH".into(), db.path().join("db.sqlite3").display().to_string())]),
        setup_env: BTreeMap::new(),
        startup_timeout: Duration::from_secs(60),
        isolation,
        spawn_commands: BTreeSet::new(),
        prefork,
        recycle_after_jobs: None,
        recycle_above_rss: None,
        caller_dir: None,
    };

    // The two fork modes take turns, job by job, so that whatever else runs
    // on the machine weighs on both alike. The subprocess mode runs after
    // them, alone. (In spawn mode the worker sits idle: `spawn_job` bypasses it.)
    let mut results = Vec::new();
    let mut timed = Vec::new();
    for (label, isolation, prefork) in MODES {
        let worker = Worker::start(opts(isolation, prefork)).await?;
        for _ in 0..WARMUP_RUNS {
            run_noop(&worker).await?;
        }
        timed.push((label, worker, Vec::with_capacity(runs)));
    }
    let (fork_modes, spawn_mode) = timed.split_at_mut(2);
    eprintln!("fork modes, taking turns: {WARMUP_RUNS} warm-up + {runs} timed runs of `noop` each");
    for _ in 0..runs {
        for (_, worker, samples) in fork_modes.iter_mut() {
            samples.push(run_noop(worker).await?);
        }
    }
    eprintln!("subprocess: {runs} timed runs of `noop`");
    for (_, worker, samples) in spawn_mode.iter_mut() {
        for _ in 0..runs {
            samples.push(run_noop(worker).await?);
        }
    }
    let info = timed[0].1.info().context("the worker is not up")?;
    for (label, worker, samples) in timed {
        worker.shutdown().await;
        results.push(Measured { label, samples, processes: String::new(), pss_kib: 0 });
    }

    // Memory, one worker at a time.
    for ((_, isolation, prefork), measured) in MODES.into_iter().zip(results.iter_mut()) {
        eprintln!("{}: memory of {CONCURRENT_JOBS} concurrent `sleep 30` jobs", measured.label);
        let worker = Worker::start(opts(isolation, prefork)).await?;
        let (processes, pss_kib) = concurrent_pss(&worker, isolation).await?;
        worker.shutdown().await;
        (measured.processes, measured.pss_kib) = (processes, pss_kib);
    }

    print_report(&info, runs, &mut results);
    Ok(())
}

/// The modes compared: label, isolation, prefork.
const MODES: [(&str, Isolation, bool); 3] = [
    ("fork, prefork spare (default)", Isolation::Fork, true),
    ("fork on demand (`prefork = false`)", Isolation::Fork, false),
    ("subprocess (python manage.py)", Isolation::Spawn, false),
];

/// Runs `noop` once; the time until it ended and both pipes hit EOF.
async fn run_noop(worker: &Worker) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut job = worker.spawn_job("noop", &[], Output::Capture).await?;
    let (stdout, stderr) = (job.stdout.take(), job.stderr.take());
    let (_, stderr, end) = tokio::join!(read_all(stdout), read_all(stderr), job.wait());
    let elapsed = started.elapsed();
    ensure!(end.success(), "noop ended with {end}: {}", String::from_utf8_lossy(&stderr?));
    Ok(elapsed)
}

async fn read_all(pipe: Option<pipe::Receiver>) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    if let Some(mut pipe) = pipe {
        pipe.read_to_end(&mut bytes).await?;
    }
    Ok(bytes)
}

/// Starts [`CONCURRENT_JOBS`] `sleep 30` jobs, waits until each has printed
/// "sleeping 30" (Django fully loaded, the command running), sums the PSS
/// of their processes plus, for fork, the worker and its idle spare, then
/// kills them. Which processes were counted, and the sum.
async fn concurrent_pss(worker: &Worker, isolation: Isolation) -> anyhow::Result<(String, u64)> {
    let args: Vec<String> = SLEEP_ARGS.iter().map(|a| a.to_string()).collect();
    let mut jobs = Vec::new();
    for _ in 0..CONCURRENT_JOBS {
        jobs.push(worker.spawn_job("sleep", &args, Output::Capture).await?);
    }
    // Readers stay alive until the kill, so no job meets a closed pipe.
    let mut readers = Vec::new();
    for job in &mut jobs {
        let mut reader = BufReader::new(job.stdout.take().context("stdout is captured")?);
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(60), reader.read_line(&mut line))
            .await
            .context("no \"sleeping 30\" within 60 s")??;
        ensure!(line.trim_end() == "sleeping 30", "unexpected first line {line:?}");
        readers.push(reader);
    }
    let job_pids: Vec<u32> = jobs.iter().map(|job| job.pid).collect();
    // Forked jobs share the worker's pages, so the worker counts too, and so
    // does the spare waiting for the next job (its own pages are its cost).
    let (processes, extra) = match isolation {
        Isolation::Fork => {
            let pid = worker.info().context("the worker is not up")?.pid;
            let spares: Vec<u32> = children(pid).into_iter().filter(|c| !job_pids.contains(c)).collect();
            let label = match spares.len() {
                0 => format!("1 worker + {CONCURRENT_JOBS} jobs"),
                n => format!("1 worker + {CONCURRENT_JOBS} jobs + {n} spare"),
            };
            (label, [vec![pid], spares].concat())
        }
        Isolation::Spawn => (CONCURRENT_JOBS.to_string(), Vec::new()),
    };
    let mut total = 0;
    for pid in job_pids.iter().chain(&extra) {
        total += pss_kib(*pid)?;
    }
    for job in &mut jobs {
        job.stop(Stop::Kill).await;
    }
    Ok((processes, total))
}

/// The children of `pid` (its main thread's list).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|child| child.parse().ok())
        .collect()
}

/// The `Pss:` line of /proc/<pid>/smaps_rollup, in KiB.
fn pss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let rollup = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let line = rollup.lines().find(|l| l.starts_with("Pss:")).with_context(|| format!("no Pss in {path}"))?;
    let kib = line.split_whitespace().nth(1).context("malformed Pss line")?;
    Ok(kib.parse()?)
}

fn print_report(info: &WorkerInfo, runs: usize, results: &mut [Measured]) {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "Machine: nproc {nproc}, Python {}, Django {}; demo project (examples/demo).",
        info.python_version, info.django_version
    );
    println!();
    println!("Per-job overhead, `noop` from `spawn_job` to exit with both pipes at EOF ({WARMUP_RUNS} warm-up runs not counted):");
    println!();
    println!("| mode | runs | p50 ms | p95 ms | mean ms |");
    println!("|---|---:|---:|---:|---:|");
    let mut p50s = Vec::new();
    for m in results.iter_mut() {
        m.samples.sort();
        let mean = m.samples.iter().sum::<Duration>() / m.samples.len() as u32;
        let (p50, p95) = (percentile(&m.samples, 50.0), percentile(&m.samples, 95.0));
        println!("| {} | {runs} | {:.1} | {:.1} | {:.1} |", m.label, ms(p50), ms(p95), ms(mean));
        p50s.push(ms(p50));
    }
    println!();
    println!(
        "Speed-up at p50: {:.0}× (subprocess p50 / prefork p50); prefork saves {:.1} ms at p50 over forking on demand.",
        p50s[2] / p50s[0],
        p50s[1] - p50s[0]
    );
    println!();
    println!(
        "Memory, {CONCURRENT_JOBS} concurrent `sleep 30` jobs, sum of `Pss:` from /proc/<pid>/smaps_rollup:"
    );
    println!();
    println!("| mode | processes | total PSS MiB | per-job MiB |");
    println!("|---|---|---:|---:|");
    for m in results.iter() {
        let mib = m.pss_kib as f64 / 1024.0;
        let per_job = mib / CONCURRENT_JOBS as f64;
        println!("| {} | {} | {mib:.1} | {per_job:.1} |", m.label, m.processes);
    }
    println!();
    println!(
        "Per-job MiB is the total divided by {CONCURRENT_JOBS}; for fork it includes a share of the worker."
    );
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
