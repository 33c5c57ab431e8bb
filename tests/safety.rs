//! Safety rules the runner enforces whatever the control plane asks
//! (issue 6): per-command concurrency limits, non-interactive commands,
//! secret redaction, resource limits and argument rules.

mod common;

use common::plane::{output, status_and_code, ControlPlane, Supervisor, LIMIT};
use dcsupervisor::local_plane::wire::{ExecutionDetail, ExecutionStatus};

fn started(execution: &ExecutionDetail) -> f64 {
    execution.summary.started_at.unwrap_or_else(|| panic!("not started: {execution:#?}"))
}

fn completed(execution: &ExecutionDetail) -> f64 {
    execution.summary.completed_at.unwrap_or_else(|| panic!("not completed: {execution:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_migrates_queued_together_run_one_after_the_other() {
    let plane = ControlPlane::start();
    let rule = "[[policy.concurrency]]\ncommand = \"migrate\"\nmax_running = 1\n";
    let _runner = Supervisor::start(&plane.url, "", rule);
    let first = plane.queue("migrate", "--verbosity 0").await;
    let second = plane.queue("migrate", "--verbosity 0").await;
    let (first, second) = (plane.wait_done(&first, LIMIT).await, plane.wait_done(&second, LIMIT).await);
    assert_eq!(status_and_code(&first), ("success", 0));
    assert_eq!(status_and_code(&second), ("success", 0));
    let (earlier, later) =
        if started(&first) <= started(&second) { (&first, &second) } else { (&second, &first) };
    assert!(started(later) >= completed(earlier), "they overlapped: {earlier:#?} {later:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_command_can_be_refused_instead() {
    let plane = ControlPlane::start();
    let rule = "[[policy.concurrency]]\ncommand = \"sleep\"\nmax_running = 1\nwhen_busy = \"refuse\"\n";
    let _runner = Supervisor::start(&plane.url, "", rule);
    let first = plane.queue("sleep", "2").await;
    plane.wait_status(&first, LIMIT, |s| s == ExecutionStatus::Running).await;
    let second = plane.wait_done(&plane.queue("sleep", "1").await, LIMIT).await;
    assert_eq!(status_and_code(&second), ("failed", -1));
    assert!(
        output(&second, true).contains("at most 1 'sleep' may run at a time"),
        "{}",
        output(&second, true)
    );
    assert_eq!(status_and_code(&plane.wait_done(&first, LIMIT).await), ("success", 0));
    // Other commands are not held back by the rule.
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_prompts_fails_fast_instead_of_hanging() {
    let plane = ControlPlane::start();
    let _runner = Supervisor::start(&plane.url, "", "");
    let prompt = plane.wait_done(&plane.queue("prompt", "").await, LIMIT).await;
    assert_eq!(status_and_code(&prompt), ("failed", 1));
    assert!(output(&prompt, true).contains("EOFError"), "{}", output(&prompt, true));
    let seconds = completed(&prompt) - started(&prompt);
    assert!(seconds < 30.0, "it did not wait for the 300 s timeout ({seconds} s)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_masked_across_chunks_streams_and_line_breaks() {
    let plane = ControlPlane::start();
    let redaction = "[redaction]\nvalues = [\"abcdef123-secret\", \"line-one-xyz\\nline-two-xyz\"]\nfrom_env = [\"DEMO_TOKEN\"]\n";
    let runner = Supervisor::start_with(
        &plane.url,
        "",
        redaction,
        common::demo_project(),
        &[("DEMO_TOKEN", "env-token-0987")],
    );
    // Halves 0.5 s apart with chunks every 0.2 s: they would land in different chunks.
    let args = "--delay 0.5 'a first line that goes out at once\\ntoken=abcdef' '123-secret\\n'";
    let split = plane.wait_done(&plane.queue("say", args).await, LIMIT).await;
    assert_eq!(output(&split, false), "a first line that goes out at once\ntoken=[REDACTED]\n");
    assert!(common::plane::chunks(&split).len() >= 2, "the output did span chunks: {split:#?}");

    let stderr =
        plane.wait_done(&plane.queue("say", "--stderr 'err: abcdef123-secret\\n'").await, LIMIT).await;
    assert_eq!(output(&stderr, true), "err: [REDACTED]\n");

    let lines = plane
        .wait_done(&plane.queue("say", "--delay 0.3 'line-one-xyz\\n' 'line-two-xyz\\n'").await, LIMIT)
        .await;
    assert_eq!(output(&lines, false), "[REDACTED]\n");

    let env = plane.wait_done(&plane.queue("say", "'from env: env-token-0987\\n'").await, LIMIT).await;
    assert_eq!(output(&env, false), "from env: [REDACTED]\n");

    for execution in [&split, &stderr, &lines, &env] {
        assert_eq!(status_and_code(execution), ("success", 0));
    }
    assert!(!runner.log().contains("abcdef123-secret") && !runner.log().contains("env-token-0987"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_limits_end_runaway_jobs_and_say_which_limit() {
    let plane = ControlPlane::start();
    // hog gets no CPU limit: zeroing gigabytes under load could reach 1 s first.
    let limits =
        "[limits]\ncpu_seconds = 1\nnice = 5\n[limits.commands.hog]\nmemory_mb = 1024\ncpu_seconds = 0\n";
    let _runner = Supervisor::start_with(&plane.url, "", limits, common::demo_project(), &[]);
    let spin = plane.wait_done(&plane.queue("spin", "").await, LIMIT).await;
    assert_eq!(status_and_code(&spin), ("failed", -24), "SIGXCPU: {spin:#?}");
    assert!(output(&spin, true).contains("reached its CPU time limit (1 s)"), "{}", output(&spin, true));

    // A job allocating without bound gets a MemoryError, not the box's memory.
    let hog = plane.wait_done(&plane.queue("hog", "").await, LIMIT).await;
    assert_eq!(status_and_code(&hog), ("failed", 1));
    let stderr = output(&hog, true);
    assert!(
        stderr.contains("MemoryError") && stderr.contains("reached its memory limit (1024 MiB)"),
        "{stderr}"
    );
    // Commands within their limits are unaffected.
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
}

const ARGUMENT_RULES: &str = r#"
[[policy.arguments]]
command = "migrate"
refuse_options = ["database"]
refuse_positionals = [["*", "zero"]]

[[policy.arguments]]
command = "noisy"
allow_options = { lines = "^[0-9]{1,3}$" }
"#;

/// Queues `command args` and waits for it to be refused: its stderr.
async fn refused(plane: &ControlPlane, command: &str, args: &str) -> String {
    let execution = plane.wait_done(&plane.queue(command, args).await, LIMIT).await;
    assert_eq!(status_and_code(&execution), ("failed", -1), "{execution:#?}");
    assert_eq!(output(&execution, false), "", "a refused command never runs: {execution:#?}");
    let stderr = output(&execution, true);
    assert!(
        stderr.starts_with(&format!("Command '{command}' rejected by runner security policy.")),
        "{stderr}"
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_rules_refuse_options_and_positionals_even_abbreviated() {
    let plane = ControlPlane::start();
    let _runner = Supervisor::start(&plane.url, ARGUMENT_RULES, "");
    let stderr = refused(&plane, "migrate", "--datab=default").await;
    assert!(
        stderr.contains(
            "Reason: option --database (given as --datab) is refused for 'migrate' by [[policy.arguments]]"
        ),
        "{stderr}"
    );
    assert!(refused(&plane, "migrate", "--database default").await.contains("option --database is refused"));
    // A database the project lacks: the command's own parser refuses it first.
    let stderr = refused(&plane, "migrate", "--datab=other").await;
    assert!(stderr.contains("--database") && stderr.contains("invalid choice: 'other'"), "{stderr}");

    let stderr = refused(&plane, "migrate", "demo zero").await;
    assert!(
        stderr.contains(r#"positional arguments ["demo", "zero"] match the pattern ["*", "zero"]"#),
        "{stderr}"
    );
    // What the rules leave alone runs.
    let fine = plane.wait_done(&plane.queue("migrate", "--verbosity 0").await, LIMIT).await;
    assert_eq!(status_and_code(&fine), ("success", 0), "{fine:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_options_lets_only_listed_options_with_matching_values_through() {
    let plane = ControlPlane::start();
    let _runner = Supervisor::start(&plane.url, ARGUMENT_RULES, "");
    let five = plane.wait_done(&plane.queue("noisy", "--lines 5").await, LIMIT).await;
    assert_eq!(status_and_code(&five), ("success", 0), "{five:#?}");
    assert_eq!(output(&five, false), "out 0\nout 1\nout 2\nout 3\nout 4\n");

    let stderr = refused(&plane, "noisy", "--lines 5000").await;
    assert!(stderr.contains(r#"value "5000" of option --lines does not match "^[0-9]{1,3}$""#), "{stderr}");
    let stderr = refused(&plane, "noisy", "--lines 5 --flush").await;
    assert!(stderr.contains("option --flush is not in the allow_options of 'noisy'"), "{stderr}");
    let stderr = refused(&plane, "noisy", "--lin 5 --fl").await;
    assert!(stderr.contains("option --flush (given as --fl) is not in the allow_options"), "{stderr}");
    // Not parsable at all: argparse's own message.
    let stderr = refused(&plane, "noisy", "--lines x").await;
    assert!(
        stderr.contains(
            "the command's parser refused the arguments: Error: argument --lines: invalid int value: 'x'"
        ),
        "{stderr}"
    );
    // Commands without rules are not asked about.
    assert_eq!(status_and_code(&plane.wait_done(&plane.queue("noop", "").await, LIMIT).await).0, "success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_from_django_settings_are_masked() {
    let plane = ControlPlane::start();
    let redaction = "[redaction]\nfrom_django_settings = [\"SECRET_KEY\", \"DATABASES.*.NAME\"]\n";
    let _runner = Supervisor::start(&plane.url, "", redaction);
    // diffsettings prints every setting that differs from Django's defaults.
    let diff = plane.wait_done(&plane.queue("diffsettings", "").await, LIMIT).await;
    assert_eq!(status_and_code(&diff), ("success", 0));
    let out = output(&diff, false);
    assert!(out.contains("SECRET_KEY = '[REDACTED]'"), "{out}");
    assert!(!out.contains("django-insecure-demo-only"), "{out}");
    assert!(!out.contains("db.sqlite3"), "the database path (a DATABASES.*.NAME) is masked too: {out}");
}
