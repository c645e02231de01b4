//! The `kfdmux` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kfdmux", version, about = "A userspace /dev/kfd: every open gets its own isolated GPU context, served over FUSE by a simulated KFD", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon: serve kfd and render-node files backed by simulated GPUs until SIGTERM.
    Serve(Box<kfdmux::daemon::ServeOptions>),
    /// Run a program (default: rocminfo) unmodified against kfdmux, in a private mount
    /// namespace where /dev/kfd, the render nodes and the sysfs topology are kfdmux's.
    Run(kfdmux::run::RunOptions),
    /// Run the protocol acceptance suite as a client against a kfd file (FUSE or CUSE):
    /// contexts per open, EBADF after fork, pointer ioctls, blocking waits, release on close.
    Check(kfdmux::check::CheckOptions),
    /// Read a trace recorded with `serve --record`.
    Trace {
        #[command(subcommand)]
        cmd: TraceCmd,
    },
    /// Re-issue a recorded trace against a device and compare errno and every output field;
    /// exits 0 when the replay matched, 1 when it did not.
    Replay(kfdmux::trace::replay::ReplayOptions),
    /// Check a daemon configuration file (`serve --config`): every mistake with its line.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Container Device Interface: the spec for a configuration's instances, and its hook.
    Cdi {
        #[command(subcommand)]
        cmd: CdiCmd,
    },
    /// Kubernetes device plugin: advertise the configuration's instances to the kubelet as
    /// resource kfdmux.dev/gpu and answer Allocate with their CDI device names.
    #[cfg(feature = "deviceplugin")]
    DevicePlugin(kfdmux::deviceplugin::PluginOptions),
    /// Write the sysfs topology tree of a GPU list (what /sys/devices/virtual/kfd would hold).
    Topology {
        /// GPUs, e.g. `gfx90a:2,gfx1030` (presets: gfx90a, gfx942, gfx1030).
        #[arg(long)]
        gpus: String,
        /// Output directory; the tree is written under DIR/kfd/topology.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Report the mistakes in FILE with line numbers (exit 1), or summarise its instances.
    Check { file: PathBuf },
}

#[derive(Subcommand)]
enum CdiCmd {
    /// Write the CDI spec (kind kfdmux.dev/gpu, one device per instance).
    Generate(kfdmux::cdi::GenerateOptions),
    /// OCI createContainer hook named by the spec: makes /dev/kfd symlinks for FUSE instances.
    Hook(kfdmux::cdi::HookOptions),
}

#[derive(Subcommand)]
enum TraceCmd {
    /// Print one line per call, decoded like strace (or JSON lines with --json).
    Show(kfdmux::trace::show::ShowOptions),
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let r: Result<i32, String> = match cli.cmd {
        Cmd::Serve(o) => kfdmux::daemon::serve(&o).map(|_| 0),
        Cmd::Run(o) => kfdmux::run::run_command(&o),
        Cmd::Check(o) => Ok(kfdmux::check::run(&o).min(1)),
        Cmd::Trace {
            cmd: TraceCmd::Show(o),
        } => kfdmux::trace::show::run(&o),
        Cmd::Replay(o) => kfdmux::trace::replay::run(&o)
            .map_err(|e| {
                eprintln!("kfdmux: {e}");
                2
            })
            .or_else(Ok::<i32, String>),
        Cmd::Config {
            cmd: ConfigCmd::Check { file },
        } => Ok(kfdmux::config::check_command(&file)),
        Cmd::Cdi {
            cmd: CdiCmd::Generate(o),
        } => kfdmux::cdi::generate_command(&o),
        Cmd::Cdi {
            cmd: CdiCmd::Hook(o),
        } => kfdmux::cdi::hook_command(&o),
        #[cfg(feature = "deviceplugin")]
        Cmd::DevicePlugin(o) => kfdmux::deviceplugin::run(&o),
        Cmd::Topology { gpus, out } => kfdmux::sysfs::topology_command(&gpus, &out).map(|_| {
            println!("wrote {}", out.join("kfd/topology").display());
            0
        }),
    };
    match r {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("kfdmux: {e}");
            ExitCode::from(1)
        }
    }
}
