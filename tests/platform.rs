//! Adapter choice, the CI Vulkan guarantee, and the `devices` command.

use sddpm_gpu::gpu::{choose_adapter, list_adapters, AdapterSummary, Context};

fn fake(name: &str, backend: wgpu::Backend, device_type: wgpu::DeviceType) -> AdapterSummary {
    AdapterSummary {
        name: name.into(),
        backend,
        device_type,
        driver: String::new(),
        driver_info: String::new(),
        features: wgpu::Features::empty(),
        limits: wgpu::Limits::default(),
        subgroup_sizes: (0, 0),
    }
}

#[test]
fn best_adapter_is_discrete_then_integrated_then_virtual_then_cpu() {
    use wgpu::{Backend as B, DeviceType as D};
    let list = vec![
        fake("llvmpipe", B::Vulkan, D::Cpu),
        fake("Intel UHD", B::Vulkan, D::IntegratedGpu),
        fake("NVIDIA H100 (GL)", B::Gl, D::DiscreteGpu),
        fake("NVIDIA H100", B::Vulkan, D::DiscreteGpu),
        fake("virgl", B::Vulkan, D::VirtualGpu),
    ];
    assert_eq!(choose_adapter(&list, None).unwrap(), 3, "discrete on a native API wins");
    assert_eq!(choose_adapter(&list[..2], None).unwrap(), 1);
    assert_eq!(choose_adapter(&[list[0].clone(), list[4].clone()], None).unwrap(), 1);
    assert_eq!(choose_adapter(&list, Some("LLVMPIPE")).unwrap(), 0, "substring, case-insensitive");
    let err = choose_adapter(&list, Some("radeon")).unwrap_err().to_string();
    assert!(err.contains("radeon") && err.contains("llvmpipe"), "{err}");
    assert!(choose_adapter(&[], None).unwrap_err().to_string().contains("mesa-vulkan-drivers"));
}

#[test]
fn under_ci_the_adapter_is_vulkan() {
    let ctx = Context::new(None).expect("an adapter");
    println!("adapter: {}", ctx.describe());
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        assert_eq!(
            ctx.adapter.backend,
            wgpu::Backend::Vulkan,
            "CI must run on Vulkan (lavapipe), not a silent GL fallback: {}",
            ctx.describe()
        );
    }
    // The device gets the adapter's real limits, not wgpu's conservative defaults.
    assert_eq!(ctx.limits.max_storage_buffer_binding_size, ctx.adapter.limits.max_storage_buffer_binding_size);
}

#[test]
fn wanted_features_are_enabled_when_offered() {
    let ctx = Context::new(None).unwrap();
    let offered = ctx.adapter.features & sddpm_gpu::gpu::WANTED_FEATURES;
    assert_eq!(ctx.features, offered);
    assert!(ctx.device.features().contains(offered));
}

#[test]
fn list_adapters_marks_the_chosen_one() {
    let (list, chosen) = list_adapters(None).unwrap();
    assert!(chosen < list.len());
    assert!(list_adapters(Some("no-such-adapter-xyz")).is_err());
}

#[test]
fn devices_command_lists_the_adapter() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sddpm-gpu")).arg("devices").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let ctx = Context::new(None).unwrap();
    let chosen_line = text.lines().find(|l| l.starts_with('*')).expect("a chosen adapter");
    assert!(chosen_line.contains(&ctx.adapter.name), "{text}");
    assert!(text.contains("backend") && text.contains("storage binding"), "{text}");
}

#[test]
fn devices_with_unknown_adapter_fails_with_one_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sddpm-gpu"))
        .args(["devices", "--adapter", "no-such-gpu"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("error: no adapter")).collect();
    assert_eq!(ours.len(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
