//! The GPU context: adapter choice, device with the features and limits we use, and error capture.
//!
//! wgpu reports most errors asynchronously through an "uncaptured error" handler that panics by
//! default. We install our own handler that records them, wrap every operation that can fail in
//! error scopes, and turn everything into `anyhow` errors with context, so a bad shader, an
//! out-of-memory or a lost device ends a command with a message instead of a panic or garbage.

use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context as _, Result};

/// Features we use when the adapter has them; none is required. The cooperative-matrix feature
/// is requested only together with the rest of [`COOP_FEATURES`], where the adapter also lists a
/// configuration our kernels use (see [`AdapterSummary::coop_sizes`]) and SDDPM_KERNELS allows it.
pub const WANTED_FEATURES: wgpu::Features = wgpu::Features::TIMESTAMP_QUERY
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS)
    .union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES)
    .union(wgpu::Features::SHADER_F16)
    .union(wgpu::Features::SUBGROUP)
    .union(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);

/// What the cooperative-matrix (tensor-core) kernels need: the matrices, f16 fragments, and
/// subgroups (each subgroup of a workgroup owns some of its tile's fragments).
pub const COOP_FEATURES: wgpu::Features =
    wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX.union(wgpu::Features::SHADER_F16).union(wgpu::Features::SUBGROUP);

/// Which kernels may serve where a pass offers a cooperative-matrix variant (SDDPM_KERNELS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KernelPolicy {
    /// The tuner chooses among all candidates, cooperative-matrix ones included.
    #[default]
    Auto,
    /// Every pass that has a cooperative-matrix variant runs it (an error where the adapter has
    /// none); a variant that fails its self-check still falls back, with a notice.
    Coop,
    /// No cooperative-matrix kernel runs, and the device is opened without the feature.
    F32,
}

impl KernelPolicy {
    /// SDDPM_KERNELS: unset or empty means auto.
    pub fn from_env() -> Result<KernelPolicy> {
        match std::env::var("SDDPM_KERNELS").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(KernelPolicy::Auto),
            Ok("coop") => Ok(KernelPolicy::Coop),
            Ok("f32") => Ok(KernelPolicy::F32),
            Ok(other) => bail!("SDDPM_KERNELS is '{other}'; set it to auto, coop or f32 (or unset it)"),
        }
    }
}

/// What a user or test needs to know about one adapter.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: wgpu::Backend,
    pub device_type: wgpu::DeviceType,
    pub driver: String,
    pub driver_info: String,
    /// PCI bus id (`0000:01:00.0`) where the API reports it (Vulkan), else empty: the order in
    /// which MPI ranks take the discrete GPUs of a node ([`rank_order`]).
    pub pci_bus_id: String,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    pub subgroup_sizes: (u32, u32),
    /// The cooperative-matrix configurations the adapter lists (empty without the feature).
    pub coop_matrices: Vec<wgpu::CooperativeMatrixProperties>,
}

impl AdapterSummary {
    fn of(adapter: &wgpu::Adapter) -> Self {
        let info = adapter.get_info();
        AdapterSummary {
            name: info.name.clone(),
            backend: info.backend,
            device_type: info.device_type,
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
            pci_bus_id: info.device_pci_bus_id.clone(),
            features: adapter.features(),
            limits: adapter.limits(),
            subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
            coop_matrices: if adapter.features().contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
                adapter.cooperative_matrix_properties()
            } else {
                Vec::new()
            },
        }
    }

    /// Fragment sides F of the square F x F x F configurations with f16 inputs and f32
    /// accumulation that the adapter lists, ascending: the shapes our cooperative-matrix kernels
    /// are instantiated for (8: lavapipe 26, Apple; 16: NVIDIA and AMD through Vulkan). Empty
    /// unless the adapter also has the rest of [`COOP_FEATURES`].
    pub fn coop_sizes(&self) -> Vec<u32> {
        use wgpu::CooperativeScalarType as T;
        if !self.features.contains(COOP_FEATURES) {
            return Vec::new();
        }
        let mut sizes: Vec<u32> = self
            .coop_matrices
            .iter()
            .filter(|c| c.m_size == c.n_size && c.n_size == c.k_size && c.ab_type == T::F16 && c.cr_type == T::F32)
            .map(|c| c.m_size)
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes
    }

    /// One line per listed cooperative-matrix configuration, e.g. "8x8x8 f16 x f16 -> f32".
    pub fn coop_descriptions(&self) -> Vec<String> {
        self.coop_matrices
            .iter()
            .map(|c| {
                let t = |t: wgpu::CooperativeScalarType| format!("{t:?}").to_lowercase();
                format!(
                    "{}x{}x{} {} x {} -> {}{}",
                    c.m_size,
                    c.n_size,
                    c.k_size,
                    t(c.ab_type),
                    t(c.ab_type),
                    t(c.cr_type),
                    if c.saturating_accumulation { " (saturating)" } else { "" }
                )
            })
            .collect()
    }

    /// Short names of the wanted features this adapter has.
    pub fn feature_names(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (flag, name) in [
            (wgpu::Features::TIMESTAMP_QUERY, "timestamps"),
            (wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES, "timestamps-in-passes"),
            (wgpu::Features::SHADER_F16, "f16"),
            (wgpu::Features::SUBGROUP, "subgroups"),
            (wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX, "cooperative-matrix"),
        ] {
            if self.features.contains(flag) {
                out.push(name);
            }
        }
        out
    }
}

/// Lower is better: discrete > integrated > virtual > CPU; native APIs before GL.
fn adapter_rank(s: &AdapterSummary) -> (u8, u8) {
    let kind = match s.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let api = match s.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (kind, api)
}

fn instance() -> wgpu::Instance {
    // Honours WGPU_BACKEND (and the other WGPU_* variables wgpu documents).
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

fn all_adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
    let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
    pollster::block_on(instance.enumerate_adapters(backends))
}

/// The API names WGPU_BACKEND may list (comma-separated), as wgpu reads them.
const BACKEND_NAMES: &[&str] =
    &["vulkan", "vk", "metal", "mtl", "dx12", "d3d12", "gl", "gles", "opengl", "webgpu", "noop"];

/// WGPU_BACKEND, if set, names only APIs wgpu knows (wgpu itself skips unknown names with a log
/// line nobody sees, and then finds no adapter): else one line naming the variable and the fix.
pub fn check_backend_env() -> Result<()> {
    let Ok(value) = std::env::var("WGPU_BACKEND") else { return Ok(()) };
    let bad: Vec<&str> =
        value.split(',').map(str::trim).filter(|b| !BACKEND_NAMES.contains(&b.to_lowercase().as_str())).collect();
    if !bad.is_empty() {
        bail!(
            "WGPU_BACKEND={value}: unknown API {}; set it to vulkan, metal, dx12 or gl (comma-separated), or unset it",
            bad.iter().map(|b| format!("'{b}'")).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// Index of the adapter we would choose among `list`, given an optional name substring.
pub fn choose_adapter(list: &[AdapterSummary], name: Option<&str>) -> Result<usize> {
    if list.is_empty() {
        check_backend_env()?;
        let limited = std::env::var("WGPU_BACKEND")
            .map_or_else(|_| String::new(), |v| format!(" among the APIs WGPU_BACKEND={v} allows"));
        bail!(
            "no GPU adapter found{limited}: install a Vulkan, Metal or DX12 driver \
             (on a headless Linux box: apt install mesa-vulkan-drivers)"
        );
    }
    let candidates: Vec<usize> = match name {
        Some(sub) => {
            let sub = sub.to_lowercase();
            let hits: Vec<usize> = (0..list.len()).filter(|&i| list[i].name.to_lowercase().contains(&sub)).collect();
            if hits.is_empty() {
                let names: Vec<String> = list.iter().map(|a| format!("{} ({:?})", a.name, a.backend)).collect();
                bail!(
                    "no adapter name contains '{sub}' (from --adapter or SDDPM_ADAPTER); available: {}",
                    names.join(", ")
                );
            }
            hits
        }
        None => (0..list.len()).collect(),
    };
    Ok(*candidates.iter().min_by_key(|&&i| adapter_rank(&list[i])).expect("candidates is not empty"))
}

/// The discrete GPUs of `list` in the order node-local MPI ranks take them: by PCI bus id where
/// the API reports one (adapters without come after, in wgpu's order), each GPU once (the
/// native API's adapter when GL lists it too). Vulkan ignores CUDA_VISIBLE_DEVICES, so this
/// order, the same in every rank of a node, is what spreads the ranks over the GPUs.
pub fn rank_order(list: &[AdapterSummary]) -> Vec<usize> {
    let mut order: Vec<usize> =
        (0..list.len()).filter(|&i| list[i].device_type == wgpu::DeviceType::DiscreteGpu).collect();
    order.sort_by_key(|&i| (list[i].pci_bus_id.is_empty(), list[i].pci_bus_id.clone(), adapter_rank(&list[i]).1, i));
    let mut seen = std::collections::HashSet::new();
    order.retain(|&i| list[i].pci_bus_id.is_empty() || seen.insert(list[i].pci_bus_id.clone()));
    // Without bus ids a GPU listed by two APIs cannot be told apart: keep the native APIs'.
    if order.iter().any(|&i| adapter_rank(&list[i]).1 == 0) {
        order.retain(|&i| adapter_rank(&list[i]).1 == 0 || !list[i].pci_bus_id.is_empty());
    }
    order
}

/// The adapter of node-local rank `local` (None: not one of several ranks, [`choose_adapter`]):
/// a name (--adapter, SDDPM_ADAPTER) overrides; else the `local`-th of [`rank_order`]; a node
/// with no discrete GPU gives every rank the best adapter there is (a CPU adapter in CI).
pub fn choose_for_rank(list: &[AdapterSummary], name: Option<&str>, local: Option<usize>) -> Result<usize> {
    let Some(local) = local.filter(|_| name.is_none()) else { return choose_adapter(list, name) };
    let order = rank_order(list);
    if order.is_empty() {
        return choose_adapter(list, None);
    }
    match order.get(local) {
        Some(&i) => Ok(i),
        None => bail!(
            "node-local rank {local} has no GPU of its own: this node has {} discrete GPU(s) ({}); start at most {} \
             ranks per node, or pick one with --adapter NAME",
            order.len(),
            order.iter().map(|&i| list[i].name.clone()).collect::<Vec<_>>().join(", "),
            order.len()
        ),
    }
}

/// Every adapter wgpu can see (respecting WGPU_BACKEND), and the index we would choose.
pub fn list_adapters(name: Option<&str>) -> Result<(Vec<AdapterSummary>, usize)> {
    let inst = instance();
    let list: Vec<AdapterSummary> = all_adapters(&inst).iter().map(AdapterSummary::of).collect();
    let chosen = choose_adapter(&list, name)?;
    Ok((list, chosen))
}

/// Counts of GPU objects created, so tests can prove a replay creates none.
#[derive(Debug, Default)]
pub struct Counters {
    pub buffers: AtomicUsize,
    pub bind_groups: AtomicUsize,
    pub pipelines: AtomicUsize,
}

/// Snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub buffers: usize,
    pub bind_groups: usize,
    pub pipelines: usize,
}

/// Pipeline cache key: shader (name and source: one file may be built into several modules, e.g.
/// per cooperative-matrix shape), entry point, the override constants' values and whether
/// workgroup memory is zero-initialised.
type PipelineKey = (&'static str, usize, &'static str, String, bool);

/// A device, its queue, and the bookkeeping every other module needs.
pub struct Context {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter: AdapterSummary,
    /// Features actually enabled on the device.
    pub features: wgpu::Features,
    /// Limits actually granted (the adapter's own, not wgpu's conservative defaults).
    pub limits: wgpu::Limits,
    /// Fragment sides of the cooperative-matrix kernels this device can run (see
    /// [`AdapterSummary::coop_sizes`]); empty where the feature is not enabled.
    pub coop_sizes: Vec<u32>,
    pub counters: Counters,
    /// Which kernels may serve where cooperative-matrix variants exist (SDDPM_KERNELS): the
    /// device is opened with or without the feature accordingly.
    pub kernels: KernelPolicy,
    /// Compile every shader with wgpu's runtime bounds checks. When false, [`Shader::trusted`]
    /// modules skip them (a few percent of ALU in index-heavy kernels on GPUs; the hot loops of
    /// conv and matmul are all index arithmetic). Default: on in debug builds, off in release;
    /// SDDPM_SHADER_CHECKS=1|0 overrides, and the op tests turn it on (see [`shader_checks_from_env`]).
    /// Set it before the first pipeline is created: pipelines are cached.
    pub shader_checks: bool,
    errors: Arc<Mutex<Vec<String>>>,
    lost: Arc<Mutex<Option<String>>>,
    pipelines: Mutex<std::collections::HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    /// Per-device state of the layers above (the tuner's policy and record: crate::tune::tuning),
    /// one value per type, made on first use: the context only stores it, so this layer depends on
    /// none of them.
    extensions: Mutex<std::collections::HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl Context {
    /// This device's state of type `T` kept by a layer above (see the `extensions` field), made by
    /// `init` on first use; every later call gets the same value.
    pub fn extension<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Arc<T> {
        let mut map = self.extensions.lock().unwrap();
        let value = map.entry(TypeId::of::<T>()).or_insert_with(|| Arc::new(init())).clone();
        value.downcast::<T>().expect("stored under its own type")
    }

    /// Open the best adapter, or the first whose name contains `adapter_name` (case-insensitive).
    /// `None` falls back to the SDDPM_ADAPTER environment variable.
    pub fn new(adapter_name: Option<&str>) -> Result<Context> {
        Self::with_features(adapter_name, wgpu::Features::empty())
    }

    /// [`Context::new`] for node-local MPI rank `local` (see [`choose_for_rank`]).
    pub fn for_rank(adapter_name: Option<&str>, local: Option<usize>) -> Result<Context> {
        Self::choose(adapter_name, wgpu::Features::empty(), KernelPolicy::from_env()?, local)
    }

    /// As [`Context::new`], but never enabling the features in `without` (e.g. timestamps, to
    /// exercise the host-timer fallback of the profiler).
    pub fn with_features(adapter_name: Option<&str>, without: wgpu::Features) -> Result<Context> {
        Self::open(adapter_name, without, KernelPolicy::from_env()?)
    }

    /// As [`Context::with_features`], with the cooperative-matrix policy `kernels` instead of
    /// SDDPM_KERNELS's.
    pub fn open(adapter_name: Option<&str>, without: wgpu::Features, kernels: KernelPolicy) -> Result<Context> {
        Self::choose(adapter_name, without, kernels, None)
    }

    fn choose(
        adapter_name: Option<&str>,
        without: wgpu::Features,
        kernels: KernelPolicy,
        local_rank: Option<usize>,
    ) -> Result<Context> {
        let env_name = std::env::var("SDDPM_ADAPTER").ok();
        let name = adapter_name.or(env_name.as_deref()).filter(|s| !s.is_empty());
        let inst = instance();
        let adapters = all_adapters(&inst);
        let list: Vec<AdapterSummary> = adapters.iter().map(AdapterSummary::of).collect();
        let idx = choose_for_rank(&list, name, local_rank)?;
        let adapter = &adapters[idx];
        let mut features = WANTED_FEATURES & adapter.features() & !without;
        let coop_sizes = list[idx].coop_sizes();
        let coop = kernels != KernelPolicy::F32 && !coop_sizes.is_empty() && !without.intersects(COOP_FEATURES);
        if kernels == KernelPolicy::Coop && !coop {
            let listed = list[idx].coop_descriptions();
            bail!(
                "SDDPM_KERNELS=coop, but adapter '{}' has no cooperative matrices with f16 inputs and f32 accumulation \
                 (it lists {}); set SDDPM_KERNELS=auto or f32",
                list[idx].name,
                if listed.is_empty() { "none".to_string() } else { listed.join(", ") }
            );
        }
        if !coop {
            features.remove(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        }
        let limits = adapter.limits();
        // SAFETY: experimental features may be unsound in wgpu (its documentation's warning);
        // the only experimental one we request is cooperative matrices, used only by kernels
        // that pass a self-check against the f32 path on this adapter first (crate::tune).
        let experimental_features = if coop {
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("sddpm-gpu"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .with_context(|| format!("opening a device on adapter '{}'", list[idx].name))?;

        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap().push(error_chain(&e));
        }));
        let lost = Arc::new(Mutex::new(None));
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            *lost_sink.lock().unwrap() = Some(format!("{reason:?}: {msg}"));
        });

        Ok(Context {
            device,
            queue,
            adapter: list[idx].clone(),
            features,
            limits,
            coop_sizes: if coop { coop_sizes } else { Vec::new() },
            counters: Counters::default(),
            kernels,
            shader_checks: shader_checks_from_env(),
            errors,
            lost,
            pipelines: Mutex::new(Default::default()),
            extensions: Mutex::new(Default::default()),
        })
    }

    /// One line naming the adapter, for logs and error messages.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, {})",
            self.adapter.name, self.adapter.backend, self.adapter.device_type, self.adapter.driver
        )
    }

    /// Fail if the device was lost or an error escaped the error scopes since the last check.
    pub fn check(&self) -> Result<()> {
        if let Some(msg) = self.lost.lock().unwrap().clone() {
            bail!("GPU device lost ({msg}) on {}", self.describe());
        }
        let mut errs = self.errors.lock().unwrap();
        if !errs.is_empty() {
            let all = errs.join("; ");
            errs.clear();
            bail!("GPU error on {}: {all}", self.describe());
        }
        Ok(())
    }

    /// Run `f` inside validation and out-of-memory error scopes; any error it caused becomes `Err`.
    pub fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = o {
            bail!("out of GPU memory while {what} on {}: {}", self.describe(), error_chain(&e));
        }
        if let Some(e) = v {
            bail!("GPU validation error while {what}: {}", error_chain(&e));
        }
        self.check()?;
        Ok(out)
    }

    /// Block until all submitted work is done.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("waiting for the GPU failed on {}: {e}", self.describe()))?;
        self.check()
    }

    /// Block until the given submission is done.
    pub fn wait_for(&self, index: wgpu::SubmissionIndex) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: Some(index), timeout: None })
            .map_err(|e| anyhow!("waiting for the GPU failed on {}: {e}", self.describe()))?;
        self.check()
    }

    /// Largest byte size one storage binding may have on this device.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    pub fn counter_snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            buffers: self.counters.buffers.load(Ordering::Relaxed),
            bind_groups: self.counters.bind_groups.load(Ordering::Relaxed),
            pipelines: self.counters.pipelines.load(Ordering::Relaxed),
        }
    }

    /// Create a buffer (counted). `size` is rounded up to 4 bytes and at least 4.
    pub fn create_buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
        if size > self.limits.max_buffer_size {
            bail!(
                "buffer '{label}' needs {size} bytes but {} allows at most {} per buffer; use a smaller batch or image size",
                self.adapter.name,
                self.limits.max_buffer_size
            );
        }
        self.counters.buffers.fetch_add(1, Ordering::Relaxed);
        let size = size.max(4).div_ceil(4) * 4;
        self.scoped(&format!("creating buffer '{label}' ({size} bytes)"), || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        })
    }

    /// A compute pipeline for `entry` in `shader`, created once and cached by name.
    pub fn pipeline(&self, shader: &Shader, entry: &'static str) -> Result<Arc<wgpu::ComputePipeline>> {
        self.pipeline_with(shader, entry, &[], true)
    }

    /// As [`Context::pipeline`], with WGSL `override` constants filled in and, for kernels that
    /// write their workgroup memory before reading it, without its zero-initialisation; cached
    /// by all of these, so each variant of a kernel is its own pipeline.
    pub fn pipeline_with(
        &self,
        shader: &Shader,
        entry: &'static str,
        constants: &[(&'static str, f64)],
        zero_init_workgroup_memory: bool,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let key =
            (shader.name, shader.source.as_ptr() as usize, entry, format!("{constants:?}"), zero_init_workgroup_memory);
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let pipeline = self.scoped(&format!("compiling shaders/{}.wgsl entry '{entry}'", shader.name), || {
            let desc = wgpu::ShaderModuleDescriptor {
                label: Some(shader.name),
                source: wgpu::ShaderSource::Wgsl(shader.source.into()),
            };
            let module = if shader.trusted && !self.shader_checks {
                // Only the bounds checks go: loops stay bounded and integer division stays
                // guarded, so a zero-sized parameter cannot turn into undefined behaviour.
                let mut checks = wgpu::ShaderRuntimeChecks::checked();
                checks.bounds_checks = false;
                // SAFETY: `trusted` shaders index only within the bindings their parameters
                // describe (Shader::trusted); the op tests run them with checks on against CPU
                // references on odd shapes, and the model parity tests run them without.
                unsafe { self.device.create_shader_module_trusted(desc, checks) }
            } else {
                self.device.create_shader_module(desc)
            };
            self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&format!("{}::{entry}", shader.name)),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: zero_init_workgroup_memory,
                },
                cache: None,
            })
        })?;
        self.counters.pipelines.fetch_add(1, Ordering::Relaxed);
        let p = Arc::new(pipeline);
        self.pipelines.lock().unwrap().insert(key, p.clone());
        Ok(p)
    }

    /// Create a bind group (counted).
    pub fn bind_group(&self, desc: &wgpu::BindGroupDescriptor) -> Result<wgpu::BindGroup> {
        self.counters.bind_groups.fetch_add(1, Ordering::Relaxed);
        self.scoped("creating a bind group", || self.device.create_bind_group(desc))
    }

    /// Copy `src` into a fresh mappable buffer and read it back as 32-bit words.
    pub fn read_buffer(&self, src: &wgpu::Buffer, bytes: u64) -> Result<Vec<u32>> {
        self.read_buffer_range(src, 0, bytes)
    }

    /// [`Context::read_buffer`] of the `bytes` of `src` from byte `offset` (a multiple of 4).
    pub fn read_buffer_range(&self, src: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<Vec<u32>> {
        let staging =
            self.create_buffer("readback", bytes, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST)?;
        self.read_via(src, offset, &staging, bytes)
    }

    /// Copy `bytes` of `src` from byte `offset` into `staging` (MAP_READ | COPY_DST) and read them
    /// back.
    pub fn read_via(&self, src: &wgpu::Buffer, offset: u64, staging: &wgpu::Buffer, bytes: u64) -> Result<Vec<u32>> {
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src, offset, staging, 0, bytes);
        self.queue.submit([enc.finish()]);
        let slice = staging.slice(0..bytes);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|_| anyhow!("readback callback never ran"))?
            .map_err(|e| anyhow!("mapping a readback buffer failed: {e}"))?;
        let out = {
            let view = slice.get_mapped_range().map_err(|e| anyhow!("reading a mapped buffer failed: {e}"))?;
            bytemuck::cast_slice::<u8, u32>(&view).to_vec()
        };
        staging.unmap();
        Ok(out)
    }
}

/// An error with all its sources, on one line (wgpu puts the useful part in the sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        src = s.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether to keep wgpu's runtime bounds checks in [`Shader::trusted`] modules: SDDPM_SHADER_CHECKS
/// set to 1/on or 0/off decides, else on in debug builds only.
pub fn shader_checks_from_env() -> bool {
    match std::env::var("SDDPM_SHADER_CHECKS").as_deref() {
        Ok("1" | "on" | "true") => true,
        Ok("0" | "off" | "false") => false,
        _ => cfg!(debug_assertions),
    }
}

/// A WGSL source file from shaders/, embedded in the binary.
#[derive(Debug, PartialEq)]
pub struct Shader {
    /// File stem in shaders/, e.g. "conv".
    pub name: &'static str,
    pub source: &'static str,
    /// In bounds by construction: every entry guards each buffer index with the sizes in its
    /// parameters, which the op derives from the very shapes the graph allocates, and indexes
    /// nothing with values read from data. Such modules may run without wgpu's runtime bounds
    /// checks (see [`Context::shader_checks`]).
    pub trusted: bool,
}

/// Declare a `Shader` for shaders/NAME.wgsl. `shader!("NAME", uses "A", "B")` prepends
/// shaders/common/A.wgsl and B.wgsl, in that order (WGSL has no includes: a helper two shaders
/// need is written once there); a leading `trusted` marks it in bounds by construction
/// ([`Shader::trusted`]).
#[macro_export]
macro_rules! shader {
    (trusted $($rest:tt)*) => {
        $crate::gpu::Shader { trusted: true, ..$crate::shader!($($rest)*) }
    };
    ($name:literal) => {
        $crate::gpu::Shader {
            name: $name,
            source: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $name, ".wgsl")),
            trusted: false,
        }
    };
    // With shared WGSL from shaders/common/ prepended (WGSL has no includes).
    ($name:literal, uses $($common:literal),+) => {
        $crate::gpu::Shader {
            name: $name,
            source: concat!(
                $(include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/common/", $common, ".wgsl")),)+
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/shaders/", $name, ".wgsl"))
            ),
            trusted: false,
        }
    };
}
