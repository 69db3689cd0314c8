//! Adapter choice: a real GPU first, the software driver as fallback, and a
//! user override by name or index (`--adapter`, `MOTIF_ADAPTER`).

use crate::error::{EngineError, Result};

/// What `motif info` shows about one adapter.
#[derive(Debug, Clone)]
pub struct AdapterSummary {
    pub index: usize,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub is_cpu: bool,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}] {} ({}, {}{})",
            self.index,
            self.name,
            self.backend,
            self.device_type,
            if self.driver.is_empty() {
                String::new()
            } else {
                format!(", {}", self.driver)
            }
        )
    }
}

/// The backends Motif runs on. GL is left out: it has no compute shaders with
/// the storage-buffer sizes the networks need.
pub(crate) fn backends() -> wgpu::Backends {
    wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12
}

pub(crate) fn summarize(index: usize, adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    let driver = [info.driver.as_str(), info.driver_info.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    AdapterSummary {
        index,
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver,
        is_cpu: info.device_type == wgpu::DeviceType::Cpu,
    }
}

/// Preference order: discrete GPU, integrated GPU, virtual GPU, anything
/// else, and the CPU (software) adapter last.
fn rank(device_type: wgpu::DeviceType) -> u8 {
    match device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Picks the adapter: `requested` is an index into the enumeration order or a
/// case-insensitive substring of the adapter's name (e.g. `llvmpipe`, `nvidia`).
pub(crate) fn choose(
    adapters: Vec<wgpu::Adapter>,
    requested: Option<&str>,
) -> Result<wgpu::Adapter> {
    if adapters.is_empty() {
        return Err(EngineError::NoAdapter);
    }
    let list = || {
        adapters
            .iter()
            .enumerate()
            .map(|(i, a)| format!("  {}", summarize(i, a)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let index = match requested.map(str::trim).filter(|s| !s.is_empty()) {
        Some(req) => {
            if let Ok(i) = req.parse::<usize>() {
                if i >= adapters.len() {
                    return Err(EngineError::AdapterNotFound {
                        requested: req.into(),
                        available: list(),
                    });
                }
                i
            } else {
                let needle = req.to_lowercase();
                match adapters
                    .iter()
                    .position(|a| a.get_info().name.to_lowercase().contains(&needle))
                {
                    Some(i) => i,
                    None => {
                        return Err(EngineError::AdapterNotFound {
                            requested: req.into(),
                            available: list(),
                        })
                    }
                }
            }
        }
        None => (0..adapters.len())
            .min_by_key(|&i| (rank(adapters[i].get_info().device_type), i))
            .expect("adapters is not empty"),
    };
    Ok(adapters
        .into_iter()
        .nth(index)
        .expect("index checked above"))
}
