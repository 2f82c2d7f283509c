//! `weft`: the Weft proxy.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use weft_proxy::metrics::Metrics;
use weft_proxy::process::{self, Options};

// A request allocates a few dozen small objects and frees them on the same thread; mimalloc's
// thread-local free lists make that markedly cheaper than glibc's allocator.
#[global_allocator]
static ALLOCATOR: Allocator = Allocator;

unsafe extern "C" {
    /// mimalloc's runtime options (`mi_option_set`).
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
    fn mi_malloc(size: usize) -> *mut std::ffi::c_void;
    fn mi_zalloc(size: usize) -> *mut std::ffi::c_void;
    fn mi_realloc(p: *mut std::ffi::c_void, size: usize) -> *mut std::ffi::c_void;
}

/// The alignment every mimalloc block of at least this size has (two machine words).
const MI_MIN_ALIGN: usize = 16;

/// mimalloc, asked for an alignment only when a type needs more than every block has. The
/// `mimalloc` crate always asks (`mi_malloc_aligned`), and mimalloc serves a block over 1 KiB
/// whose size class is not a power of two through its over-allocating path: about 150
/// instructions more for each of a request's large objects (its boxed future, read buffers).
struct Allocator;

impl Allocator {
    fn plain(align: usize, size: usize) -> bool {
        align <= MI_MIN_ALIGN && align <= size
    }
}

// SAFETY (the four functions): the pointers come from and go back to the linked mimalloc;
// `plain` sends a layout to the unaligned entry points only when mimalloc's own alignment
// (MI_MIN_ALIGN for blocks of that size or more) covers it, else to `MiMalloc`'s aligned ones.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::plain(layout.align(), layout.size()) {
            // SAFETY: see above.
            unsafe { mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: see above.
            unsafe { mimalloc::MiMalloc.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::plain(layout.align(), layout.size()) {
            // SAFETY: see above.
            unsafe { mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: see above.
            unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: see above (mimalloc frees aligned and plain blocks alike).
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        if Self::plain(layout.align(), size) {
            // SAFETY: see above.
            unsafe { mi_realloc(ptr.cast(), size).cast() }
        } else {
            // SAFETY: see above.
            unsafe { mimalloc::MiMalloc.realloc(ptr, layout, size) }
        }
    }
}

/// `mi_option_arena_eager_commit` (mimalloc v2's `mimalloc.h`).
const MI_OPTION_ARENA_EAGER_COMMIT: std::ffi::c_int = 4;

/// Commits arena memory when it is used, not when it is reserved: an idle proxy stays small.
/// Runs from `.init_array`, before the first allocation reserves an arena.
extern "C" fn tune_allocator() {
    // SAFETY: a plain option setter of the linked mimalloc.
    unsafe { mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "Weft: a programmable proxy for service meshes and edges"
)]
struct Cli {
    /// Log filter (e.g. `info`, `debug`, `weft_proxy=debug`); RUST_LOG wins when set.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// The configuration file (YAML); with `--control-plane`, the optional bootstrap
        /// (admin listener, static parts).
        #[arg(long, short, required_unless_present = "control_plane")]
        config: Option<PathBuf>,
        /// Worker threads (default: one per core).
        #[arg(long, default_value_t = 0)]
        workers: usize,
        /// Take listeners, routes, clusters and filters from this weft-cp too
        /// (`https://host:port`; replicas separated by commas: the proxy talks to one and moves
        /// to another when it goes away); the config file then holds the static parts. The
        /// first start enrolls with a join token (WEFT_JOIN_TOKEN or --join-token-file).
        #[arg(long, value_name = "URL")]
        control_plane: Option<String>,
        /// With --insecure-plaintext: this proxy's id at the control plane (default: the host
        /// name). On the TLS link the registration decides it.
        #[arg(long, requires = "control_plane")]
        node_id: Option<String>,
        /// With --insecure-plaintext: a label resources select this proxy by
        /// (`--label app=reviews`; repeatable). On the TLS link the registration decides them.
        #[arg(long = "label", value_name = "KEY=VALUE", requires = "control_plane")]
        labels: Vec<String>,
        /// Where the last good snapshot, fetched modules and the identity are kept.
        #[arg(long, default_value = "weft-state", requires = "control_plane")]
        state_dir: PathBuf,
        /// A file holding the join token `weftctl node add` printed (WEFT_JOIN_TOKEN works too).
        #[arg(long, value_name = "FILE", requires = "control_plane")]
        join_token_file: Option<PathBuf>,
        /// Talk to the control plane without TLS (an http:// URL): development only.
        #[arg(long, requires = "control_plane")]
        insecure_plaintext: bool,
    },
    /// Check a configuration file: exit 0 if valid, else print every error and exit 1.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Install the nat rules that send this network namespace's TCP traffic through its
    /// sidecar (what a pod's init container runs, with NET_ADMIN and NET_RAW). Running it
    /// again leaves one set of rules; --cleanup removes them.
    Init(InitArgs),
}

#[derive(clap::Args)]
struct InitArgs {
    /// The uid the sidecar runs as: its own connections are not captured.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    /// The gid the sidecar runs as (default: the uid).
    #[arg(long)]
    proxy_gid: Option<u32>,
    /// Where outbound connections are redirected (the sidecar's outbound_port).
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    /// Where inbound connections are redirected (the sidecar's inbound_port).
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    /// The workload's ports, comma-separated, or `*` for every port.
    #[arg(long, default_value = "*")]
    inbound_ports: String,
    /// Inbound ports never redirected (e.g. the admin port probes use), comma-separated.
    #[arg(long, default_value = "")]
    exclude_inbound_ports: String,
    /// Outbound destination ports never redirected, comma-separated.
    #[arg(long, default_value = "")]
    exclude_outbound_ports: String,
    /// Outbound destinations (CIDRs) reached directly, comma-separated.
    #[arg(long, default_value = "")]
    exclude_outbound_cidrs: String,
    /// IPv6 rules too: auto (when the namespace has IPv6), on, off.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    ipv6: String,
    /// Print the rules (as iptables-restore input) instead of installing them.
    #[arg(long)]
    dry_run: bool,
    /// Remove every rule and chain `weft init` installed.
    #[arg(long)]
    cleanup: bool,
}

fn init(a: InitArgs) -> Result<(), String> {
    use weft_proxy::sidecar::init::{self, Action, Family, Plan};
    let inbound_ports = match a.inbound_ports.trim() {
        "*" => None,
        list => {
            let ports = init::parse_ports(list).map_err(|e| format!("--inbound-ports: {e}"))?;
            if ports.is_empty() {
                return Err("--inbound-ports: empty (give ports, or * for every port)".into());
            }
            Some(ports)
        }
    };
    let cidrs = a
        .exclude_outbound_cidrs
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| c.parse())
        .collect::<Result<Vec<_>, String>>()
        .map_err(|e| format!("--exclude-outbound-cidrs: {e}"))?;
    let plan = Plan {
        proxy_uid: a.proxy_uid,
        proxy_gid: a.proxy_gid.unwrap_or(a.proxy_uid),
        outbound_port: a.outbound_port,
        inbound_port: a.inbound_port,
        inbound_ports,
        exclude_inbound_ports: init::parse_ports(&a.exclude_inbound_ports)
            .map_err(|e| format!("--exclude-inbound-ports: {e}"))?,
        exclude_outbound_ports: init::parse_ports(&a.exclude_outbound_ports)
            .map_err(|e| format!("--exclude-outbound-ports: {e}"))?,
        exclude_outbound_cidrs: cidrs,
    };
    let ipv6 = match a.ipv6.as_str() {
        "on" => true,
        "off" => false,
        _ => init::ipv6_present(),
    };
    let families: &[Family] = if ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    let action = if a.cleanup {
        Action::Cleanup
    } else {
        Action::Install
    };
    init::run(&plan, action, families, a.dry_run, &mut std::io::stdout())
}

/// The control-plane options; the token comes from `WEFT_CP_TOKEN` (never a flag: flags show
/// in `ps`).
fn control_options(
    urls: String,
    node_id: Option<String>,
    labels: Vec<String>,
    state_dir: PathBuf,
    join_token_file: Option<PathBuf>,
    insecure: bool,
) -> Result<weft_proxy::control::ControlOptions, String> {
    let urls: Vec<String> = urls
        .split(',')
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err("--control-plane: no URL".into());
    }
    for url in &urls {
        weft_proxy::control::link::split_url(url, insecure)?;
    }
    let join_token = match join_token_file {
        Some(f) => Some(
            std::fs::read_to_string(&f)
                .map_err(|e| format!("--join-token-file {}: {e}", f.display()))?
                .trim()
                .to_owned(),
        ),
        None => std::env::var("WEFT_JOIN_TOKEN")
            .ok()
            .map(|t| t.trim().to_owned()),
    }
    .filter(|t| !t.is_empty());
    let mut map = std::collections::BTreeMap::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .ok_or_else(|| format!("--label {l:?}: expected KEY=VALUE"))?;
        map.insert(k.to_owned(), v.to_owned());
    }
    let node_id = match node_id {
        Some(n) if !n.is_empty() => n,
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .ok_or("--node-id: required (no host name to default to)")?,
    };
    // Proxies start at a random replica: they spread over the replicas.
    let first = fastrand::usize(..urls.len());
    Ok(weft_proxy::control::ControlOptions {
        urls,
        current: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(first)),
        node_id,
        labels: map,
        token: std::env::var("WEFT_CP_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
        state_dir,
        insecure,
        join_token,
        identity: None,
        module_trust: Vec::new(),
    })
}

fn validate(
    config: &std::path::Path,
) -> Result<weft_proxy::snapshot::Snapshot, weft_proxy::config::ConfigErrors> {
    let metrics = std::sync::Arc::new(Metrics::new());
    let wasm = weft_proxy::wasm::WasmShared::new(metrics.clone());
    // A configuration for mesh proxies (`tls: mesh`) is checked with a stand-in identity.
    let identity = weft_proxy::identity::svid::placeholder().ok();
    process::load(config, 1, None, &metrics, &wasm, identity.as_ref())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Init(args) => {
            let (dry_run, cleanup) = (args.dry_run, args.cleanup);
            match init(args) {
                Ok(()) => {
                    if !dry_run {
                        eprintln!(
                            "weft init: {}",
                            if cleanup {
                                "rules removed"
                            } else {
                                "rules installed"
                            }
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("weft init: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Validate { config } => match validate(&config) {
            Ok(s) => {
                println!(
                    "{}: valid ({} listeners, {} route tables, {} clusters; {})",
                    config.display(),
                    s.config.listeners.len(),
                    s.config.routes.len(),
                    s.config.clusters.len(),
                    s.digest
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for e in &errors.0 {
                    eprintln!("{e}");
                }
                eprintln!(
                    "{}: {} error{}",
                    config.display(),
                    errors.0.len(),
                    if errors.0.len() == 1 { "" } else { "s" }
                );
                ExitCode::FAILURE
            }
        },
        Command::Run {
            config,
            workers,
            control_plane,
            node_id,
            labels,
            state_dir,
            join_token_file,
            insecure_plaintext,
        } => {
            let control = match control_plane {
                None => None,
                Some(url) => match control_options(
                    url,
                    node_id,
                    labels,
                    state_dir,
                    join_token_file,
                    insecure_plaintext,
                ) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::FAILURE;
                    }
                },
            };
            let logs = weft_proxy::logging::init(&cli.log_level);
            // Without a bootstrap file, an empty one under the state directory stands in.
            let config = match (config, &control) {
                (Some(c), _) => c,
                (None, Some(c)) => {
                    let path = c.state_dir.join("bootstrap.yaml");
                    let written = std::fs::create_dir_all(&c.state_dir).and_then(|()| {
                        std::fs::write(
                            &path,
                            "# No bootstrap was given: everything comes from the control plane.\n{}\n",
                        )
                    });
                    if let Err(e) = written {
                        eprintln!("--state-dir {}: {e}", c.state_dir.display());
                        return ExitCode::FAILURE;
                    }
                    path
                }
                (None, None) => {
                    eprintln!("--config is required");
                    return ExitCode::FAILURE;
                }
            };
            match process::run(Options {
                config_path: config,
                workers,
                control,
                log_dropped: Some(logs.dropped()),
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use super::Allocator;

    /// Every size and alignment a type may ask for gets a block aligned so, before and after
    /// growing and shrinking it, with its bytes kept; over-aligned layouts included.
    #[test]
    fn blocks_are_aligned_as_asked_and_keep_their_bytes() {
        let sizes = [
            1, 7, 8, 15, 16, 24, 40, 100, 1000, 1025, 1500, 3000, 5000, 70_000,
        ];
        let aligns = [1, 2, 4, 8, 16, 32, 64, 128, 4096];
        for size in sizes {
            for align in aligns {
                for zeroed in [false, true] {
                    let layout = Layout::from_size_align(size, align).expect("layout");
                    // SAFETY: non-zero sizes; each block is used within its size, reallocated
                    // and freed with the layout it has at the time.
                    unsafe {
                        let mut p = if zeroed {
                            Allocator.alloc_zeroed(layout)
                        } else {
                            Allocator.alloc(layout)
                        };
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "size {size}, align {align}");
                        if zeroed {
                            assert!((0..size).all(|i| *p.add(i) == 0));
                        }
                        for i in 0..size {
                            *p.add(i) = i as u8;
                        }
                        let mut now = layout;
                        for new in [size * 3, size.div_ceil(2)] {
                            p = Allocator.realloc(p, now, new);
                            assert!(!p.is_null());
                            assert_eq!(p as usize % align, 0, "{size} -> {new}, align {align}");
                            let kept = now.size().min(new);
                            assert!((0..kept).all(|i| *p.add(i) == i as u8));
                            now = Layout::from_size_align(new, align).expect("layout");
                        }
                        Allocator.dealloc(p, now);
                    }
                }
            }
        }
    }
}
