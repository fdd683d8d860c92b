//! The `sddpm-gpu` command line: one small function per subcommand, all work in the library.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use sddpm_gpu::gpu;

#[derive(Parser)]
#[command(
    name = "sddpm-gpu",
    version,
    about = "Spiking DDPMs on any GPU wgpu reaches (Vulkan, Metal, DX12)"
)]
struct Cli {
    /// Use the first adapter whose name contains this (case-insensitive); default: the best one
    /// (discrete > integrated > virtual > CPU). WGPU_BACKEND=vulkan|metal|dx12|gl limits the APIs.
    #[arg(long, global = true, env = "SDDPM_ADAPTER")]
    adapter: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List every GPU adapter with the features and limits that matter; `*` marks the one chosen.
    Devices,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Devices => devices(cli.adapter.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn devices(adapter: Option<&str>) -> Result<()> {
    let (list, chosen) = gpu::list_adapters(adapter)?;
    for (i, a) in list.iter().enumerate() {
        let mark = if i == chosen { "*" } else { " " };
        println!("{mark} [{i}] {}", a.name);
        println!(
            "      backend {:?}, type {:?}, driver {} {}",
            a.backend, a.device_type, a.driver, a.driver_info
        );
        let feats = a.feature_names();
        println!(
            "      features: {}",
            if feats.is_empty() {
                "none of timestamps/f16/subgroups".to_string()
            } else {
                feats.join(", ")
            }
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
    }
    println!(
        "* = chosen (override with --adapter NAME or SDDPM_ADAPTER; WGPU_BACKEND limits the APIs)"
    );
    Ok(())
}
