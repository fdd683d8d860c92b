//! Adapter choice, the CI Vulkan guarantee, and the `devices` command.

use sddpm_gpu::gpu::{choose_adapter, choose_for_rank, list_adapters, rank_order, AdapterSummary, Context};

fn fake(name: &str, backend: wgpu::Backend, device_type: wgpu::DeviceType) -> AdapterSummary {
    AdapterSummary {
        name: name.into(),
        backend,
        device_type,
        driver: String::new(),
        driver_info: String::new(),
        pci_bus_id: String::new(),
        features: wgpu::Features::empty(),
        limits: wgpu::Limits::default(),
        subgroup_sizes: (0, 0),
        coop_matrices: Vec::new(),
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

fn gpu(name: &str, backend: wgpu::Backend, bus: &str) -> AdapterSummary {
    AdapterSummary { pci_bus_id: bus.into(), ..fake(name, backend, wgpu::DeviceType::DiscreteGpu) }
}

/// MPI ranks of a node take its discrete GPUs in PCI bus order, each GPU once whichever APIs
/// list it; --adapter overrides; a node without discrete GPUs shares its best adapter; a rank
/// beyond the GPUs is refused with the fix.
#[test]
fn ranks_take_the_discrete_gpus_in_pci_bus_order() {
    use wgpu::{Backend as B, DeviceType as D};
    let list = vec![
        fake("llvmpipe", B::Vulkan, D::Cpu),
        gpu("GPU at 41", B::Vulkan, "0000:41:00.0"),
        gpu("GPU at 41 (GL)", B::Gl, "0000:41:00.0"),
        gpu("GPU at 01", B::Vulkan, "0000:01:00.0"),
        fake("Intel UHD", B::Vulkan, D::IntegratedGpu),
        gpu("GPU at 81", B::Vulkan, "0000:81:00.0"),
    ];
    assert_eq!(rank_order(&list), [3, 1, 5], "bus order, each GPU once, the native API's adapter");
    assert_eq!(choose_for_rank(&list, None, Some(0)).unwrap(), 3);
    assert_eq!(choose_for_rank(&list, None, Some(1)).unwrap(), 1);
    assert_eq!(choose_for_rank(&list, None, Some(2)).unwrap(), 5);
    assert_eq!(choose_for_rank(&list, Some("uhd"), Some(2)).unwrap(), 4, "--adapter overrides the rank");
    assert_eq!(choose_for_rank(&list, None, None).unwrap(), choose_adapter(&list, None).unwrap(), "one process");
    let err = choose_for_rank(&list, None, Some(3)).unwrap_err().to_string();
    assert!(err.contains("rank 3") && err.contains("3 discrete GPU(s)") && err.contains("--adapter"), "{err}");
    // No bus ids (another API): wgpu's order, the native API's adapters only.
    let plain = vec![
        fake("A (GL)", B::Gl, D::DiscreteGpu),
        fake("A", B::Vulkan, D::DiscreteGpu),
        fake("B", B::Vulkan, D::DiscreteGpu),
    ];
    assert_eq!(rank_order(&plain), [1, 2]);
    // No discrete GPU (CI's lavapipe): every rank shares the best adapter.
    let cpu = vec![fake("Intel UHD", B::Vulkan, D::IntegratedGpu), fake("llvmpipe", B::Vulkan, D::Cpu)];
    for r in 0..3 {
        assert_eq!(choose_for_rank(&cpu, None, Some(r)).unwrap(), 0);
    }
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

/// Trusted modules compiled without runtime bounds checks compute the same bits as checked ones
/// (a conv over spikes, BatchNorm with batch statistics, a neuron and a matmul, on odd shapes).
#[test]
fn trusted_kernels_without_bounds_checks_give_the_same_bits() {
    use sddpm_gpu::graph::{Graph, Plan};
    use sddpm_gpu::ops::{batchnorm, conv, matmul, neuron};
    let (t, b, cin, cout, h, w) = (2, 3, 5, 7, 9, 11);
    let mut g = Graph::new();
    let x = g.input("x", &[t * b, cin, h, w]);
    let cw = g.param("conv.weight", &[cout, cin, 3, 3]);
    let cb = g.param("conv.bias", &[cout]);
    let bn = batchnorm::BnParams {
        weight: g.param("bn.weight", &[cout]),
        bias: g.param("bn.bias", &[cout]),
        running_mean: g.param("bn.running_mean", &[cout]),
        running_var: g.param("bn.running_var", &[cout]),
        groups: batchnorm::BnGroups::ONE,
    };
    let s = neuron::neuron_forward(&mut g, x, t, neuron::Neuron::default(), "neuron");
    let y = conv::conv2d(&mut g, s, cw, Some(cb), 2, 1, "conv");
    let (y, _) = batchnorm::batchnorm_train(&mut g, y, bn, "bn");
    let ho = conv::conv_out(h, 3, 2, 1) * conv::conv_out(w, 3, 2, 1);
    let flat = g.input("flat", &[t * b * cout, ho]);
    let mw = g.param("m.weight", &[13, ho]);
    let m = matmul::linear(&mut g, flat, mw, None, "m");
    g.mark_output(y);
    g.mark_output(m);
    let values = |n: usize, k: u32| -> Vec<u32> {
        (0..n).map(|i| ((((i as u32).wrapping_mul(2654435761) ^ k) % 1000) as f32 / 400.0 - 1.0).to_bits()).collect()
    };
    let mut outs = Vec::new();
    for checks in [true, false] {
        let mut ctx = Context::new(None).unwrap();
        ctx.shader_checks = checks;
        let plan = Plan::compile(&ctx, &g).unwrap();
        for (i, id) in
            [x, cw, cb, bn.weight, bn.bias, bn.running_mean, bn.running_var, flat, mw].into_iter().enumerate()
        {
            let n = g.info(id).numel();
            let mut v = values(n, i as u32);
            if id == bn.running_var {
                v = vec![1f32.to_bits(); n];
            }
            plan.write(&ctx, id, &v).unwrap();
        }
        plan.run(&ctx).unwrap();
        let read = |id| plan.read(&ctx, id).unwrap().iter().map(|v: &f32| v.to_bits()).collect::<Vec<u32>>();
        outs.push((read(y), read(m)));
    }
    assert!(outs[0].0.iter().any(|&v| v != 0), "the conv output must not be all zeros");
    assert_eq!(outs[0], outs[1], "checked and trusted modules disagree");
}

#[test]
fn devices_reports_the_shader_bounds_check_policy() {
    for (env, want) in [("1", "on for every kernel"), ("0", "off for kernels in bounds")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sddpm-gpu"))
            .arg("devices")
            .env("SDDPM_SHADER_CHECKS", env)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("shader bounds checks: {want}")), "SDDPM_SHADER_CHECKS={env}: {text}");
    }
}
