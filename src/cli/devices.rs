//! `devices`: every adapter with the features and limits that matter, optionally its measured peak.

use anyhow::Result;

use sddpm_gpu::gpu::{self, Context};

#[derive(clap::Args)]
pub struct DevicesArgs {
    /// Also measure the chosen adapter's fp32 FMA rate and memory bandwidth (calibration
    /// kernels timed with GPU timestamps; a few seconds at most).
    #[arg(long)]
    pub bench: bool,
}

pub fn run(adapter: Option<&str>, a: &DevicesArgs) -> Result<()> {
    let kernels = gpu::KernelPolicy::from_env()?;
    let (list, chosen) = gpu::list_adapters(adapter)?;
    for (i, a) in list.iter().enumerate() {
        let mark = if i == chosen { "*" } else { " " };
        println!("{mark} [{i}] {}", a.name);
        let bus = if a.pci_bus_id.is_empty() { String::new() } else { format!(", PCI {}", a.pci_bus_id) };
        println!("      backend {:?}, type {:?}{bus}, driver {} {}", a.backend, a.device_type, a.driver, a.driver_info);
        let feats = a.feature_names();
        println!(
            "      features: {}",
            if feats.is_empty() { "none of timestamps/f16/subgroups".to_string() } else { feats.join(", ") }
        );
        let l = &a.limits;
        println!(
            "      limits: storage binding {} MiB, buffer {} MiB, workgroup storage {} KiB, invocations/workgroup {}, storage buffers/stage {}, subgroup {}..{}",
            l.max_storage_buffer_binding_size >> 20,
            l.max_buffer_size >> 20,
            l.max_compute_workgroup_storage_size >> 10,
            l.max_compute_invocations_per_workgroup,
            l.max_storage_buffers_per_shader_stage,
            a.subgroup_sizes.0,
            a.subgroup_sizes.1,
        );
        let coop = a.coop_descriptions();
        if !coop.is_empty() {
            let sizes = a.coop_sizes();
            println!(
                "      cooperative matrices: {}; our kernels use {}",
                coop.join(", "),
                if sizes.is_empty() {
                    "none of them (they need f16 x f16 -> f32, f16 and subgroups)".to_string()
                } else {
                    sizes.iter().map(|f| format!("{f}x{f}x{f}")).collect::<Vec<_>>().join(", ")
                }
            );
        }
    }
    println!("* = chosen (override with --adapter NAME or SDDPM_ADAPTER; WGPU_BACKEND limits the APIs)");
    let order = gpu::rank_order(&list);
    if order.is_empty() {
        println!("MPI ranks on this node: no discrete GPU, so every rank uses [{chosen}]");
    } else {
        let ranks: Vec<String> = order.iter().enumerate().map(|(r, &i)| format!("rank {r} -> [{i}]")).collect();
        println!("MPI ranks on this node (node-local rank, PCI bus order): {}", ranks.join(", "));
    }
    println!(
        "cooperative-matrix kernels: {} (SDDPM_KERNELS=auto|coop|f32)",
        match kernels {
            gpu::KernelPolicy::Auto => "where the adapter has them, the tuner chooses",
            gpu::KernelPolicy::Coop => "forced wherever a pass has one",
            gpu::KernelPolicy::F32 => "off",
        }
    );
    println!(
        "shader bounds checks: {} (SDDPM_SHADER_CHECKS=1|0 turns them on|off)",
        if gpu::shader_checks_from_env() { "on for every kernel" } else { "off for kernels in bounds by construction" }
    );
    if a.bench {
        let ctx = Context::new(adapter)?;
        let p = sddpm_gpu::profile::measure_peak(&ctx, std::time::Duration::from_secs(4))?;
        let mut cache = sddpm_gpu::tune::Cache::open(&ctx);
        cache.set_peak(p);
        cache.save();
        println!(
            "bench {}: fp32 FMA {:.2} GFLOP/s, memory copy {:.2} GB/s ({}, best of 3)",
            ctx.adapter.name,
            p.gflops,
            p.gbps,
            if p.gpu_timestamps { "GPU timestamps" } else { "host timers: includes submit overhead" }
        );
    }
    Ok(())
}
