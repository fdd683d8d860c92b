//! What the end-to-end benches share: flags and the model they measure.

use sddpm_gpu::model::ModelConfig;

/// The value after `name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.to_string())
}

/// (preset name, batch, config with --snn-steps applied) from `--preset`, `--batch`, `--snn-steps`.
pub fn model_from_args() -> (String, usize, ModelConfig) {
    let preset = arg("--preset", "tiny");
    let batch: usize = arg("--batch", "8").parse().expect("--batch takes a number");
    let mut cfg = ModelConfig::preset(&preset).expect("a known --preset");
    cfg.snn_steps = arg("--snn-steps", "4").parse().expect("--snn-steps takes a number");
    (preset, batch, cfg)
}
