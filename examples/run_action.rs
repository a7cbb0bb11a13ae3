//! An action runner, the way a platform's worker runs actions with packenvd (the original
//! design's "execution integration"): it registers a pack, makes sure the pack's environment
//! is ready, and runs one of the pack's actions with the environment's interpreter and
//! variables, on this host, printing the action's output.
//!
//! ```text
//! DATABASE_URL=postgres://... cargo run -p packenv-client --example run_action -- \
//!     [--timeout SECONDS] [--node NAME] PACK_DIR RUNTIME ACTION [ARGS...]
//! ```
//!
//! PACK_DIR is the pack's directory, and its name is the pack's ref. ACTION is a file in it:
//! a `.py` action runs with the environment's `python`, a `.js` one with its `node`, anything
//! else is executed as it is (shell and native packs need no environment). The runner exits
//! with the action's exit status. A packenvd daemon must be running for this host (or have
//! built the environment already).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use packenv_client::{Client, Resolved};

struct Args {
    timeout: Duration,
    node: Option<String>,
    pack_dir: PathBuf,
    runtime: String,
    action: String,
    action_args: Vec<String>,
}

const USAGE: &str =
    "usage: run_action [--timeout SECONDS] [--node NAME] PACK_DIR RUNTIME ACTION [ARGS...]";

fn parse_args() -> Result<Args, String> {
    let mut timeout = Duration::from_secs(600);
    let mut node = None;
    let mut rest = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--timeout" if rest.is_empty() => {
                let v = args.next().ok_or("--timeout needs a number of seconds")?;
                let secs: u64 = v
                    .parse()
                    .map_err(|_| format!("--timeout {v}: not a number of seconds"))?;
                timeout = Duration::from_secs(secs);
            }
            "--node" if rest.is_empty() => node = Some(args.next().ok_or("--node needs a name")?),
            "-h" | "--help" if rest.is_empty() => return Err(USAGE.into()),
            _ => rest.push(a),
        }
    }
    if rest.len() < 3 {
        return Err(USAGE.into());
    }
    let mut rest = rest.into_iter();
    let pack_dir = std::path::absolute(rest.next().unwrap_or_default())
        .map_err(|e| format!("PACK_DIR: {e}"))?;
    Ok(Args {
        timeout,
        node,
        pack_dir,
        runtime: rest.next().unwrap_or_default(),
        action: rest.next().unwrap_or_default(),
        action_args: rest.collect(),
    })
}

/// The error and its causes, one per line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!("\n  caused by: {s}"));
        source = s.source();
    }
    text
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("run_action: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, String> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "DATABASE_URL is not set".to_string())?;
    let pack = args
        .pack_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{}: not a pack directory", args.pack_dir.display()))?;
    let action = args.pack_dir.join(&args.action);
    if !action.is_file() {
        return Err(format!("{}: no such action", action.display()));
    }
    let mut client = Client::connect(&url).await.map_err(|e| chain(&e))?;
    if let Some(node) = &args.node {
        client = client.with_node(node.clone());
    }

    // The platform's pack install: the pack row (the platform owns this table), then the
    // environment, waited for.
    sqlx::query(
        "INSERT INTO pack (ref, label, version, storage_path) VALUES ($1, $1, '0.0.0', $2)
         ON CONFLICT (ref) DO NOTHING",
    )
    .bind(&pack)
    .bind(args.pack_dir.display().to_string())
    .execute(client.pool())
    .await
    .map_err(|e| format!("registering pack {pack}: {}", chain(&e)))?;
    eprintln!(
        "==> pack {pack} registered; waiting for its {} environment",
        args.runtime
    );
    client
        .ensure(&pack, &args.runtime, args.timeout)
        .await
        .map_err(|e| format!("{pack} ({}): {}", args.runtime, chain(&e)))?;

    // Before the action: this host's build, in one query. A row naming an executable or a
    // variable's path outside its build under this node's envs_root is refused here, never run.
    let env = client
        .lookup(&pack, &args.runtime)
        .await
        .map_err(|e| format!("{pack} ({}): {}", args.runtime, chain(&e)))?;
    let mut cmd = command(&env, &action)?;
    cmd.args(&args.action_args).current_dir(&args.pack_dir);
    eprintln!(
        "==> running {} on node {} with {}",
        args.action,
        env.node,
        cmd.get_program().to_string_lossy()
    );
    let status = cmd
        .status()
        .map_err(|e| format!("starting {}: {e}", cmd.get_program().to_string_lossy()))?;
    eprintln!("==> {} exited with {status}", args.action);
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// The action as a process of the environment: its interpreter by the action's kind, and the
/// environment's variables with its executables' directories first on PATH.
fn command(env: &Resolved, action: &Path) -> Result<std::process::Command, String> {
    let interpreter = match action.extension().and_then(|e| e.to_str()) {
        Some("py") => Some("python"),
        Some("js") => Some("node"),
        _ => None,
    };
    let mut cmd = match interpreter {
        Some(name) => {
            let exe = env.executable(name).map_err(|e| e.to_string())?;
            let mut cmd = std::process::Command::new(exe);
            cmd.arg(action);
            cmd
        }
        None => std::process::Command::new(action),
    };
    env.apply(&mut cmd);
    Ok(cmd)
}
