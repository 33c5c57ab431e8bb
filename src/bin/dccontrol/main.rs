//! `dccontrol`: the command line of the local control plane
//! (`dcsupervisor::local_plane`), for tests and demos.
//!
//! `dccontrol serve` runs it on a loopback address until SIGTERM or SIGINT;
//! with `--signing-key` it signs the executions it hands out (`keygen` makes
//! a key). The other subcommands are clients of its operator API, through
//! the library's typed `OperatorClient`; `operator.rs` is how they print.
//! Nothing leaves the machine.

mod operator;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use dcsupervisor::local_plane::{LocalPlane, OperatorClient, PlaneError};
use dcsupervisor::protocol::signed;
use ed25519_dalek::SigningKey;
use tokio::signal::unix::{signal, SignalKind};

use crate::operator::{OperatorError, RunOptions};

const DEFAULT_API_KEY: &str = "dc_local_demo_key";

#[derive(Parser)]
#[command(name = "dccontrol", version, about = "A local DjangoCommand control plane, for tests and demos")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the runner API and the operator API until SIGTERM/SIGINT.
    Serve(ServeArgs),
    /// Queue a command for the runner (options may come anywhere; pass
    /// arguments that start with '-' after '--').
    Run(RunArgs),
    /// Ask the runner to stop an execution.
    Cancel(CancelArgs),
    /// List the executions.
    List(ServerArgs),
    /// Show one execution and its output.
    Show(ShowArgs),
    /// Write a new Ed25519 signing key (its base64 secret seed, mode 0600) to
    /// PATH and print its public key, for `serve --signing-key` and the
    /// runner's `[policy.signing] public_key`.
    Keygen {
        /// The file to create (an existing one is not replaced).
        path: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Loopback address to listen on; port 0 picks a free one (the first
    /// stdout line says which).
    #[arg(long, env = "DCCONTROL_LISTEN", default_value = "127.0.0.1:8765", value_parser = loopback_address)]
    listen: SocketAddr,
    /// The key runners and operators must present as `Authorization: Bearer <key>`.
    #[arg(long, env = "DJANGOCOMMAND_API_KEY", default_value = DEFAULT_API_KEY, hide_env_values = true)]
    api_key: String,
    /// Sign every execution handed out with the key in this file (the base64
    /// of a 32-byte secret seed, as `dccontrol keygen` writes it).
    #[arg(long, env = "DCCONTROL_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
}

/// Where the control plane is, for the client subcommands.
#[derive(Args)]
struct ServerArgs {
    #[arg(long, env = "DCCONTROL_URL", default_value = "http://127.0.0.1:8765")]
    server: String,
    #[arg(long, env = "DJANGOCOMMAND_API_KEY", default_value = DEFAULT_API_KEY, hide_env_values = true)]
    api_key: String,
}

#[derive(Args)]
struct RunArgs {
    /// The management command's name.
    command: String,
    /// Its arguments (each one is quoted, so the runner gets the same words).
    args: Vec<String>,
    /// Seconds before the runner stops it.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Ask the runner not to capture the output.
    #[arg(long)]
    metadata_only: bool,
    /// Stream the output here and exit with the command's exit code.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args)]
struct CancelArgs {
    id: String,
    /// Kill at once (SIGKILL) instead of SIGTERM and a grace period.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args)]
struct ShowArgs {
    id: String,
    /// Print the operator API's JSON as it is.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

/// `--listen`: an IP socket address, or `localhost:PORT`. Loopback only:
/// the check is `LocalPlane::bind`'s, made here too so a mistake is a usage
/// error.
fn loopback_address(text: &str) -> Result<SocketAddr, String> {
    let address = match text.strip_prefix("localhost:") {
        Some(port) => port
            .parse::<u16>()
            .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            .map_err(|e| format!("bad port {port:?}: {e}"))?,
        None => {
            text.parse::<SocketAddr>().map_err(|e| format!("expected an address like 127.0.0.1:8765: {e}"))?
        }
    };
    if !address.ip().is_loopback() {
        return Err(PlaneError::NotLoopback(address).to_string());
    }
    Ok(address)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Keygen { path } => keygen(&path),
        client_command => operate(client_command).await.map_err(anyhow::Error::from),
    };
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("dccontrol: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<u8> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let signing_key = args.signing_key.as_deref().map(read_signing_key).transpose()?;
    if let Some(key) = &signing_key {
        let public = signed::encode_public_key(&key.verifying_key());
        tracing::info!("signing executions; the runner pins [policy.signing] public_key = {public:?}");
    }
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let plane = LocalPlane::bind(args.listen, args.api_key, signing_key).await?;
    announce(plane.local_addr())?;
    plane
        .serve(async {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        })
        .await;
    Ok(0)
}

/// The first stdout line is the bound address, so a caller that asked for
/// port 0 learns the real one.
fn announce(local: SocketAddr) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{local}")
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

fn read_signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the signing key {}", path.display()))?;
    signed::parse_secret_seed(&text).with_context(|| {
        format!(
            "{} is not a signing key (the base64 of a 32-byte seed; `dccontrol keygen` writes one)",
            path.display()
        )
    })
}

/// A fresh key from the kernel's random source, written only if `path` is new.
fn keygen(path: &Path) -> anyhow::Result<u8> {
    use std::io::{Read as _, Write as _};
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut seed))
        .context("cannot read /dev/urandom")?;
    let key = SigningKey::from_bytes(&seed);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{}", signed::encode_secret_seed(&key))
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("{}", signed::encode_public_key(&key.verifying_key()));
    Ok(0)
}

/// The client subcommands: each talks to the operator API.
async fn operate(command: Command) -> Result<u8, OperatorError> {
    match command {
        Command::Serve(_) | Command::Keygen { .. } => Ok(0), // handled by `main`
        Command::Run(args) => {
            let client = connect(&args.server)?;
            let options = RunOptions {
                command: args.command,
                args: args.args,
                timeout: args.timeout,
                metadata_only: args.metadata_only,
                follow: args.follow,
            };
            operator::run(&client, options).await
        }
        Command::Cancel(args) => operator::cancel(&connect(&args.server)?, &args.id, args.force).await,
        Command::List(server) => operator::list(&connect(&server)?).await,
        Command::Show(args) => operator::show(&connect(&args.server)?, &args.id, args.json).await,
    }
}

fn connect(server: &ServerArgs) -> Result<OperatorClient, OperatorError> {
    Ok(OperatorClient::new(&server.server, &server.api_key)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_are_served() {
        assert!(loopback_address("127.0.0.1:0").is_ok());
        assert!(loopback_address("[::1]:8765").is_ok());
        assert_eq!(loopback_address("localhost:8765").unwrap(), "127.0.0.1:8765".parse().unwrap());
        assert!(loopback_address("0.0.0.0:8765").is_err());
        assert!(loopback_address("192.168.1.2:80").is_err());
        assert!(loopback_address("example.com:80").is_err());
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
