//! The operator subcommands (`run`, `cancel`, `list`, `show`): what a person
//! does on the hosted service's web page, done from a terminal against a
//! running `dccontrol serve`.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use dcsupervisor::protocol::api::{ExecutionId, InvalidExecutionId};

use dcsupervisor::local_plane::route::OperatorRoute;
use dcsupervisor::local_plane::wire::{ChunkView, ExecutionDetail, ExecutionSummary, NewExecution};
use dcsupervisor::local_plane::{unix_now, ClientError, OperatorClient};

/// How often `run --follow` looks for new output.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    InvalidId(#[from] InvalidExecutionId),
    #[error("cannot pass the arguments: {0}")]
    Quote(#[from] shlex::QuoteError),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

/// `dccontrol run`'s choices.
pub struct RunOptions {
    pub command: String,
    pub args: Vec<String>,
    pub timeout: u64,
    pub metadata_only: bool,
    pub follow: bool,
}

/// Queues the command; with `follow`, streams its output and returns its exit
/// code (1 when it has none that fits an exit status).
pub async fn run(client: &OperatorClient, options: RunOptions) -> Result<u8, OperatorError> {
    // Quoted word by word, so the runner's shell-like split gives the same
    // words back; nothing is ever given to a shell.
    let args = shlex::try_join(options.args.iter().map(String::as_str))?;
    let request = NewExecution {
        command: options.command,
        args,
        timeout: options.timeout,
        use_metadata_only_mode: options.metadata_only,
        id: None,
        pending_overrides: None,
    };
    let id = client.queue(&request).await?;
    if !options.follow {
        println!("{id}");
        return Ok(0);
    }
    // stdout belongs to the command's output now.
    eprintln!("queued {id}");
    let detail = follow(client, &id).await?;
    eprintln!("{}", status_line(&detail.summary));
    Ok(exit_status(detail.summary.exit_code))
}

/// Prints new output as it arrives until the execution is finished.
async fn follow(client: &OperatorClient, id: &ExecutionId) -> Result<ExecutionDetail, OperatorError> {
    let mut printer = ChunkPrinter::default();
    loop {
        let detail = client.detail(id).await?;
        let finished = detail.summary.status.is_finished();
        printer.print_new(&detail.chunks, finished)?;
        if finished {
            return Ok(detail);
        }
        tokio::time::sleep(FOLLOW_INTERVAL).await;
    }
}

/// Writes chunks in number order, each once. While the execution runs, a
/// chunk waits for all lower numbers (a retried chunk may land after the next
/// one); at the end whatever is left is written, gaps or not.
#[derive(Default)]
struct ChunkPrinter {
    printed: BTreeSet<u64>,
}

impl ChunkPrinter {
    fn print_new(&mut self, chunks: &[ChunkView], finished: bool) -> std::io::Result<()> {
        for chunk in chunks {
            if self.printed.contains(&chunk.chunk_number) {
                continue;
            }
            let next_in_line = self.printed.last().map_or(1, |last| last + 1);
            if !finished && chunk.chunk_number != next_in_line {
                break;
            }
            write_chunk(chunk)?;
            self.printed.insert(chunk.chunk_number);
        }
        Ok(())
    }
}

fn write_chunk(chunk: &ChunkView) -> std::io::Result<()> {
    let mut out: Box<dyn Write> =
        if chunk.is_stderr { Box::new(std::io::stderr().lock()) } else { Box::new(std::io::stdout().lock()) };
    for segment in &chunk.segments {
        out.write_all(segment.content.as_bytes())?;
    }
    out.flush()
}

/// The exit status that stands for an execution's exit code.
fn exit_status(exit_code: Option<i32>) -> u8 {
    exit_code.and_then(|code| u8::try_from(code).ok()).unwrap_or(1)
}

/// `[success, exit code 0, 0.012 s]`
fn status_line(summary: &ExecutionSummary) -> String {
    let code = summary.exit_code.map_or_else(|| "no exit code".to_string(), |c| format!("exit code {c}"));
    let duration = match (summary.started_at, summary.completed_at) {
        (Some(start), Some(end)) => format!(", {:.3} s", (end - start).max(0.0)),
        _ => String::new(),
    };
    format!("[{}, {code}{duration}]", summary.status.as_str())
}

pub async fn cancel(client: &OperatorClient, id: &str, force: bool) -> Result<u8, OperatorError> {
    let id = ExecutionId::parse(id)?;
    let answer = client.cancel(&id, force).await?;
    let how = if answer.force_kill { "kill" } else { "cancel" };
    println!("{how} requested for {id}; the runner acts on it at its next cancel-status poll");
    Ok(0)
}

pub async fn list(client: &OperatorClient) -> Result<u8, OperatorError> {
    let executions = client.list().await?;
    if executions.is_empty() {
        println!("no executions");
        return Ok(0);
    }
    let now = unix_now();
    println!("{:<36}  {:<9}  {:>4}  {:>6}  COMMAND", "ID", "STATUS", "EXIT", "AGE");
    for execution in &executions {
        println!(
            "{:<36}  {:<9}  {:>4}  {:>6}  {}",
            execution.id,
            execution.status.as_str(),
            execution.exit_code.map_or_else(|| "-".to_string(), |c| c.to_string()),
            age(now - execution.created_at),
            command_line(execution),
        );
    }
    Ok(0)
}

pub async fn show(client: &OperatorClient, id: &str, json: bool) -> Result<u8, OperatorError> {
    let id = ExecutionId::parse(id)?;
    if json {
        let raw: serde_json::Value = client.request(OperatorRoute::Detail(id.as_str()), None::<&()>).await?;
        println!("{}", serde_json::to_string_pretty(&raw).expect("a JSON value serializes"));
        return Ok(0);
    }
    let detail = client.detail(&id).await?;
    print!("{}", summary_text(&detail));
    print!("{}", output_text(&detail.chunks));
    std::io::stdout().flush()?;
    Ok(0)
}

fn summary_text(detail: &ExecutionDetail) -> String {
    let summary = &detail.summary;
    let mut text = format!(
        "execution  {}\ncommand    {}\nstatus     {}",
        summary.id,
        command_line(summary),
        summary.status.as_str()
    );
    if let Some(code) = summary.exit_code {
        text.push_str(&format!(", exit code {code}"));
    }
    if let (Some(start), Some(end)) = (summary.started_at, summary.completed_at) {
        text.push_str(&format!(", ran {:.3} s", (end - start).max(0.0)));
    }
    text.push_str(&format!("\nqueued     {} ago\n", age(unix_now() - summary.created_at)));
    let mode = if summary.use_metadata_only_mode { ", metadata-only mode" } else { "" };
    text.push_str(&format!("timeout    {} s{mode}\n", summary.timeout));
    if detail.cancel_requested {
        let how = if detail.force_kill { "kill" } else { "cancel" };
        text.push_str(&format!("cancel     {how} requested\n"));
    }
    text
}

/// The output as one text, each line marked with its stream.
fn output_text(chunks: &[ChunkView]) -> String {
    if chunks.is_empty() {
        return "output     none\n".into();
    }
    let mut text = format!("output     {} chunk(s)\n", chunks.len());
    let mut at_line_start = true;
    let mut last_stream = None;
    for chunk in chunks {
        let stream = if chunk.is_stderr { "stderr" } else { "stdout" };
        // A stream switching mid-line starts a new line, so the mark stays true.
        if !at_line_start && last_stream != Some(stream) {
            text.push('\n');
            at_line_start = true;
        }
        last_stream = Some(stream);
        for line in chunk.segments.iter().flat_map(|s| s.content.split_inclusive('\n')) {
            if at_line_start {
                text.push_str(stream);
                text.push_str("| ");
            }
            text.push_str(line);
            at_line_start = line.ends_with('\n');
        }
    }
    if !at_line_start {
        text.push('\n');
    }
    text
}

fn command_line(summary: &ExecutionSummary) -> String {
    if summary.args.is_empty() {
        summary.command.clone()
    } else {
        format!("{} {}", summary.command, summary.args)
    }
}

/// `4s`, `12m`, `3h`, `2d`.
fn age(seconds: f64) -> String {
    let seconds = seconds.max(0.0) as u64;
    match seconds {
        0..=59 => format!("{seconds}s"),
        60..=3599 => format!("{}m", seconds / 60),
        3600..=86399 => format!("{}h", seconds / 3600),
        _ => format!("{}d", seconds / 86400),
    }
}

#[cfg(test)]
mod tests {
    use dcsupervisor::protocol::api::Segment;

    use super::*;

    fn chunk(number: u64, is_stderr: bool, content: &str) -> ChunkView {
        ChunkView {
            chunk_number: number,
            is_stderr,
            segments: vec![Segment { timestamp: Some(1.0), content: content.into() }],
        }
    }

    #[test]
    fn exit_codes_outside_a_byte_become_one() {
        assert_eq!(exit_status(Some(0)), 0);
        assert_eq!(exit_status(Some(255)), 255);
        assert_eq!(exit_status(Some(-1)), 1);
        assert_eq!(exit_status(Some(256)), 1);
        assert_eq!(exit_status(None), 1);
    }

    #[test]
    fn output_marks_each_line_with_its_stream() {
        let chunks = [chunk(1, false, "one\npart"), chunk(2, false, "ial\n"), chunk(3, true, "warn")];
        assert_eq!(
            output_text(&chunks),
            "output     3 chunk(s)\nstdout| one\nstdout| partial\nstderr| warn\n"
        );
    }

    #[test]
    fn a_chunk_waits_for_the_ones_before_it_until_the_end() {
        let mut printer = ChunkPrinter::default();
        printer.print_new(&[chunk(2, false, "")], false).unwrap();
        assert!(printer.printed.is_empty());
        printer.print_new(&[chunk(1, false, ""), chunk(2, false, ""), chunk(4, false, "")], false).unwrap();
        assert_eq!(printer.printed, BTreeSet::from([1, 2]));
        printer.print_new(&[chunk(4, false, "")], true).unwrap();
        assert_eq!(printer.printed, BTreeSet::from([1, 2, 4]));
    }
}
