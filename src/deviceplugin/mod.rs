//! Kubernetes device plugin (`kfdmux device-plugin`): advertises a configuration's instances
//! to the kubelet as one extended resource (default `kfdmux.dev/gpu`), one device per instance,
//! and answers `Allocate` with the instance's CDI device name.
//!
//! The kubelet's device-plugin API v1beta1 is gRPC over Unix sockets in the plugin directory
//! (`/var/lib/kubelet/device-plugins`): the plugin serves `v1beta1.DevicePlugin` on
//! `<dir>/kfdmux.sock` and then calls `v1beta1.Registration/Register` on `<dir>/kubelet.sock`,
//! after which the kubelet dials back, streams `ListAndWatch` (the device list, re-sent on every
//! health change) and calls `Allocate` when it starts a container that asked for the resource.
//!
//! - **Device IDs** are instance names. An instance is `Healthy` while its kfd file exists
//!   (FUSE: `<mount>/kfd`, which a dead FUSE mount fails to stat; CUSE: `/dev/<devname>`).
//! - **Allocate** answers `cdi_devices: [kfdmux.dev/gpu=<name>]` (kubelet >= 1.28) and the
//!   equivalent annotation `cdi.k8s.io/kfdmux_<name>: kfdmux.dev/gpu=<name>` that containerd
//!   and CRI-O apply when the kubelet does not pass CDI devices. The spec itself is the one the
//!   daemon publishes (src/cdi.rs). One kfdmux device per container: both would be `/dev/kfd`.
//! - **Kubelet restarts**: a restarting kubelet removes every socket in the directory and
//!   creates a new `kubelet.sock`. The plugin polls both (every health interval): when its own
//!   socket is gone it serves on a new one, and when `kubelet.sock` is a new file it registers
//!   again.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

use crate::cdi::CDI_KIND;
use crate::config::{Config, Instance};
use crate::daemon::Transport;

/// Generated from `api.proto` (package `v1beta1`) by build.rs.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod api {
    tonic::include_proto!("v1beta1");
}

use api::device_plugin_server::{DevicePlugin, DevicePluginServer};
use api::registration_client::RegistrationClient;

/// The API version sent in `RegisterRequest.version`.
pub const API_VERSION: &str = "v1beta1";
/// Where the kubelet looks for plugins.
pub const DEFAULT_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
/// The kubelet's registration socket in the plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";
/// Our socket in the plugin directory (`RegisterRequest.endpoint`).
pub const PLUGIN_SOCKET: &str = "kfdmux.sock";
/// The resource advertised unless `--resource` says otherwise.
pub const DEFAULT_RESOURCE: &str = CDI_KIND;
/// `Device.health` values the kubelet knows.
pub const HEALTHY: &str = "Healthy";
pub const UNHEALTHY: &str = "Unhealthy";
/// Prefix of the CDI annotations (understood by containerd >= 1.7 and CRI-O >= 1.23).
pub const CDI_ANNOTATION_PREFIX: &str = "cdi.k8s.io/";

#[derive(clap::Args, Debug, Clone)]
pub struct PluginOptions {
    /// The daemon's configuration file: every instance becomes a device of the resource.
    #[arg(long)]
    pub config: PathBuf,
    /// The extended resource name pods ask for (`<domain>/<name>`).
    #[arg(long, default_value = DEFAULT_RESOURCE)]
    pub resource: String,
    /// The kubelet's device-plugin directory (kubelet.sock is there; we serve kfdmux.sock).
    #[arg(long, default_value = DEFAULT_PLUGIN_DIR)]
    pub plugin_dir: PathBuf,
    /// How often to check the instances' health and the kubelet's socket, in milliseconds.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub health_interval_ms: u64,
}

/// One advertised device: an instance and the file whose existence says it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginDevice {
    /// The device ID: the instance's name.
    pub id: String,
    pub node: PathBuf,
}

/// The file that exists while `inst` serves: FUSE `<mount>/kfd`, CUSE `/dev/<devname>`.
pub fn device_node(inst: &Instance) -> PathBuf {
    match inst.transport {
        Transport::Fuse => inst.mount.join("kfd"),
        Transport::Cuse => Path::new("/dev").join(&inst.devname),
    }
}

/// The devices of `cfg`, in configuration order.
pub fn devices(cfg: &Config) -> Vec<PluginDevice> {
    cfg.instances
        .iter()
        .map(|i| PluginDevice {
            id: i.name.clone(),
            node: device_node(i),
        })
        .collect()
}

/// The fully qualified CDI name of instance `id` (`kfdmux.dev/gpu=<id>`).
pub fn cdi_device_name(id: &str) -> String {
    format!("{CDI_KIND}={id}")
}

/// The CDI annotation key for device `id`: `cdi.k8s.io/kfdmux_<id>`, the form of the CDI
/// library's `AnnotationKey("kfdmux", id)`. Its name part must be at most 63 characters; a longer
/// one falls back to the instance's index (`kfdmux_<index>`), still unique per container.
pub fn cdi_annotation_key(id: &str, index: usize) -> String {
    let name = format!("kfdmux_{id}");
    if name.len() <= 63 {
        format!("{CDI_ANNOTATION_PREFIX}{name}")
    } else {
        format!("{CDI_ANNOTATION_PREFIX}kfdmux_{index}")
    }
}

/// Checks the devices' files off the async threads: a stat of a FUSE file goes to the daemon,
/// and a hung daemon must neither stall the plugin nor pile up blocked threads (a device whose
/// previous check has not returned is reported unhealthy without starting another).
struct Prober {
    nodes: Vec<PathBuf>,
    in_flight: Vec<Arc<AtomicBool>>,
}

impl Prober {
    fn new(devices: &[PluginDevice]) -> Prober {
        Prober {
            nodes: devices.iter().map(|d| d.node.clone()).collect(),
            in_flight: devices
                .iter()
                .map(|_| Arc::new(AtomicBool::new(false)))
                .collect(),
        }
    }

    /// Health of every device; a check that takes longer than `limit` counts as unhealthy.
    async fn probe(&self, limit: Duration) -> Vec<bool> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut checks = Vec::with_capacity(self.nodes.len());
        for (node, flag) in self.nodes.iter().zip(&self.in_flight) {
            if flag.swap(true, Ordering::AcqRel) {
                checks.push(None);
                continue;
            }
            let node = node.clone();
            let flag = flag.clone();
            checks.push(Some(tokio::task::spawn_blocking(move || {
                let ok = std::fs::metadata(&node).is_ok();
                flag.store(false, Ordering::Release);
                ok
            })));
        }
        let mut out = Vec::with_capacity(checks.len());
        for c in checks {
            let ok = match c {
                Some(h) => matches!(tokio::time::timeout_at(deadline, h).await, Ok(Ok(true))),
                None => false,
            };
            out.push(ok);
        }
        out
    }
}

/// The `v1beta1.DevicePlugin` service.
#[derive(Clone)]
pub struct Plugin {
    devices: Arc<Vec<PluginDevice>>,
    health: watch::Receiver<Vec<bool>>,
}

impl Plugin {
    fn list(devices: &[PluginDevice], health: &[bool]) -> api::ListAndWatchResponse {
        api::ListAndWatchResponse {
            devices: devices
                .iter()
                .enumerate()
                .map(|(i, d)| api::Device {
                    id: d.id.clone(),
                    health: if health.get(i).copied().unwrap_or(false) {
                        HEALTHY
                    } else {
                        UNHEALTHY
                    }
                    .to_string(),
                    topology: None,
                })
                .collect(),
        }
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.devices.iter().position(|d| d.id == id)
    }

    fn known_ids(&self) -> String {
        self.devices
            .iter()
            .map(|d| d.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<api::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for Plugin {
    async fn get_device_plugin_options(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<api::DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = ListStream;

    async fn list_and_watch(
        &self,
        _: Request<api::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        log::info!(
            "ListAndWatch: the kubelet is watching {} device(s)",
            self.devices.len()
        );
        let devices = self.devices.clone();
        // The current list first, then one list per health change.
        let s = WatchStream::new(self.health.clone()).map(move |h| Ok(Plugin::list(&devices, &h)));
        Ok(Response::new(Box::pin(s)))
    }

    async fn get_preferred_allocation(
        &self,
        req: Request<api::PreferredAllocationRequest>,
    ) -> Result<Response<api::PreferredAllocationResponse>, Status> {
        let health = self.health.borrow().clone();
        let healthy = |id: &str| {
            self.index_of(id)
                .and_then(|i| health.get(i).copied())
                .unwrap_or(false)
        };
        let mut resp = api::PreferredAllocationResponse::default();
        for c in req.into_inner().container_requests {
            let want = usize::try_from(c.allocation_size).unwrap_or(0);
            let mut pick: Vec<String> = c.must_include_device_i_ds.clone();
            // Healthy devices first, in the kubelet's order.
            let mut rest: Vec<&String> = c
                .available_device_i_ds
                .iter()
                .filter(|id| !pick.contains(id))
                .collect();
            rest.sort_by_key(|id| !healthy(id));
            for id in rest {
                if pick.len() >= want {
                    break;
                }
                pick.push(id.clone());
            }
            resp.container_responses
                .push(api::ContainerPreferredAllocationResponse { device_i_ds: pick });
        }
        Ok(Response::new(resp))
    }

    async fn allocate(
        &self,
        req: Request<api::AllocateRequest>,
    ) -> Result<Response<api::AllocateResponse>, Status> {
        let health = self.health.borrow().clone();
        let mut resp = api::AllocateResponse::default();
        for c in req.into_inner().container_requests {
            if c.devices_ids.len() > 1 {
                log::warn!(
                    "Allocate: refused {:?}: more than one device",
                    c.devices_ids
                );
                return Err(Status::invalid_argument(format!(
                    "one kfdmux device per container (asked for {}: {}); each would be /dev/kfd",
                    c.devices_ids.len(),
                    c.devices_ids.join(", ")
                )));
            }
            let mut out = api::ContainerAllocateResponse::default();
            for id in &c.devices_ids {
                let Some(i) = self.index_of(id) else {
                    log::warn!("Allocate: unknown device '{id}'");
                    return Err(Status::invalid_argument(format!(
                        "unknown device '{id}' (this plugin has: {})",
                        self.known_ids()
                    )));
                };
                if !health.get(i).copied().unwrap_or(false) {
                    log::warn!("Allocate: device '{id}' is unhealthy");
                    return Err(Status::failed_precondition(format!(
                        "device '{id}' is unhealthy: {} does not exist",
                        self.devices[i].node.display()
                    )));
                }
                let name = cdi_device_name(id);
                out.annotations
                    .insert(cdi_annotation_key(id, i), name.clone());
                out.cdi_devices.push(api::CdiDevice { name });
            }
            log::info!("Allocate: {:?}", c.devices_ids);
            resp.container_responses.push(out);
        }
        Ok(Response::new(resp))
    }

    async fn pre_start_container(
        &self,
        _: Request<api::PreStartContainerRequest>,
    ) -> Result<Response<api::PreStartContainerResponse>, Status> {
        // Not requested (pre_start_required is false): nothing to prepare per container.
        Ok(Response::new(api::PreStartContainerResponse {}))
    }
}

fn options() -> api::DevicePluginOptions {
    api::DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

/// A gRPC channel over the Unix socket `path` (the kubelet's or a plugin's).
pub async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    // The URI is required but unused: the connector dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
}

/// Why a registration did not happen.
#[derive(Debug)]
enum RegisterError {
    /// The kubelet's socket does not answer (yet): try again later.
    Unreachable(String),
    /// The kubelet answered with an error (unsupported version, invalid resource name).
    Rejected(Status),
}

async fn register(kubelet: &Path, resource: &str) -> Result<(), RegisterError> {
    let limit = Duration::from_secs(10);
    let ch = tokio::time::timeout(limit, connect_unix(kubelet))
        .await
        .map_err(|_| RegisterError::Unreachable("connect timed out".into()))?
        .map_err(|e| RegisterError::Unreachable(e.to_string()))?;
    let req = api::RegisterRequest {
        version: API_VERSION.into(),
        endpoint: PLUGIN_SOCKET.into(),
        resource_name: resource.into(),
        options: Some(options()),
    };
    match tokio::time::timeout(limit, RegistrationClient::new(ch).register(req)).await {
        Err(_) => Err(RegisterError::Unreachable("Register timed out".into())),
        Ok(Ok(_)) => Ok(()),
        // A transport failure is a status too (Unavailable). The kubelet's own refusals are
        // plain Go errors, which gRPC sends as Unknown: those are rejections.
        Ok(Err(s))
            if matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
            ) =>
        {
            Err(RegisterError::Unreachable(s.message().to_string()))
        }
        Ok(Err(s)) => Err(RegisterError::Rejected(s)),
    }
}

/// (device, inode) of a file, to notice that it was replaced.
fn file_id(p: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Binds `sock` (replacing a stale socket file) and serves `plugin` on it.
fn start_server(sock: &Path, plugin: Plugin) -> Result<(JoinHandle<()>, (u64, u64)), String> {
    match std::fs::symlink_metadata(sock) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(sock)
            .map_err(|e| format!("removing stale {}: {e}", sock.display()))?,
        Ok(_) => return Err(format!("{} exists and is not a socket", sock.display())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    let id = file_id(sock).ok_or_else(|| format!("{} vanished after bind", sock.display()))?;
    let path = sock.to_path_buf();
    let h = tokio::spawn(async move {
        let r = Server::builder()
            .add_service(DevicePluginServer::new(plugin))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await;
        if let Err(e) = r {
            log::error!("serving {}: {e}", path.display());
        }
    });
    log::info!("serving v1beta1.DevicePlugin on {}", sock.display());
    Ok((h, id))
}

fn describe_health(devices: &[PluginDevice], health: &[bool]) -> String {
    devices
        .iter()
        .zip(health)
        .map(|(d, h)| format!("{} {}", d.id, if *h { HEALTHY } else { UNHEALTHY }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `kfdmux device-plugin`: runs until SIGTERM/SIGINT; exit code 1 for a bad configuration or
/// a kubelet that rejects the registration.
pub fn run(o: &PluginOptions) -> Result<i32, String> {
    let cfg = match crate::config::load(&o.config) {
        Ok(c) => c,
        Err(errs) => {
            for e in &errs {
                eprintln!("{e}");
            }
            return Ok(1);
        }
    };
    if cfg.instances.is_empty() {
        return Err(format!(
            "{}: no [[instance]] to advertise",
            o.config.display()
        ));
    }
    if !o.resource.contains('/') {
        return Err(format!(
            "--resource '{}': an extended resource name is <domain>/<name>",
            o.resource
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(run_async(o, &cfg))
}

async fn run_async(o: &PluginOptions, cfg: &Config) -> Result<i32, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let interval = Duration::from_millis(o.health_interval_ms);
    let devices = Arc::new(devices(cfg));
    let prober = Prober::new(&devices);
    let initial = prober.probe(interval).await;
    log::info!(
        "resource {}: {}",
        o.resource,
        describe_health(&devices, &initial)
    );
    let (tx, rx) = watch::channel(initial);
    let poll_devices = devices.clone();
    let poller = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let h = prober.probe(interval).await;
            tx.send_if_modified(|cur| {
                if *cur == h {
                    return false;
                }
                log::info!("health changed: {}", describe_health(&poll_devices, &h));
                *cur = h;
                true
            });
        }
    });
    let plugin = Plugin {
        devices,
        health: rx,
    };

    let sock = o.plugin_dir.join(PLUGIN_SOCKET);
    let kubelet = o.plugin_dir.join(KUBELET_SOCKET);
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("SIGINT: {e}"))?;
    let mut server: Option<(JoinHandle<()>, (u64, u64))> = None;
    let mut registered: Option<(u64, u64)> = None;
    let mut waiting_logged = false;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        // Our socket: the kubelet removes it when it restarts.
        let live = server
            .as_ref()
            .is_some_and(|(h, id)| !h.is_finished() && file_id(&sock) == Some(*id));
        if !live {
            if let Some((h, _)) = server.take() {
                log::warn!(
                    "{} was removed (kubelet restart?): serving on a new socket",
                    sock.display()
                );
                h.abort();
            }
            match start_server(&sock, plugin.clone()) {
                Ok(s) => server = Some(s),
                Err(e) => break Err(e),
            }
            // The kubelet must be told about the new socket.
            registered = None;
        }
        // The kubelet's socket: a new file means a new kubelet, which needs a new Register.
        let k = file_id(&kubelet);
        match k {
            Some(id) if registered != Some(id) => {
                if registered.is_some() {
                    log::warn!("{} was recreated (kubelet restart)", kubelet.display());
                }
                match register(&kubelet, &o.resource).await {
                    Ok(()) => {
                        log::info!(
                            "registered {} with the kubelet ({}, endpoint {PLUGIN_SOCKET})",
                            o.resource,
                            kubelet.display()
                        );
                        registered = Some(id);
                        waiting_logged = false;
                    }
                    Err(RegisterError::Rejected(s)) => {
                        break Err(format!(
                            "the kubelet refused to register {}: {} ({:?})",
                            o.resource,
                            s.message(),
                            s.code()
                        ))
                    }
                    Err(RegisterError::Unreachable(e)) => {
                        if !waiting_logged {
                            log::warn!("{}: {e}; retrying", kubelet.display());
                            waiting_logged = true;
                        }
                    }
                }
            }
            Some(_) => {}
            None => {
                if registered.take().is_some() || !waiting_logged {
                    log::info!("waiting for the kubelet ({})", kubelet.display());
                    waiting_logged = true;
                }
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.recv() => break Ok(0),
            _ = int.recv() => break Ok(0),
        }
    };
    poller.abort();
    if let Some((h, id)) = server.take() {
        h.abort();
        // Only our own socket: a new plugin may already have replaced it.
        if file_id(&sock) == Some(id) {
            let _ = std::fs::remove_file(&sock);
        }
    }
    log::info!("device plugin stopped");
    result
}
