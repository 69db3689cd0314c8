//! A pool of storage buffers. Freed tensors return their buffer here and the
//! next tensor of the same size class reuses it, so a denoising loop allocates
//! nothing after its first step.

use std::collections::HashMap;
use std::sync::Mutex;

/// Byte counts reported by the pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolStats {
    /// Bytes held by live tensors.
    pub live_bytes: u64,
    /// Bytes of all buffers the pool owns (live plus free).
    pub allocated_bytes: u64,
    /// Largest `allocated_bytes` seen since the last reset.
    pub peak_allocated_bytes: u64,
    /// Largest `live_bytes` seen since the last reset.
    pub peak_live_bytes: u64,
    /// Buffers created by the device (misses).
    pub buffers_created: u64,
    /// Allocations served from the free lists (hits).
    pub buffers_reused: u64,
}

#[derive(Default)]
struct PoolState {
    free: HashMap<u64, Vec<wgpu::Buffer>>,
    stats: PoolStats,
}

#[derive(Default)]
pub(crate) struct BufferPool {
    state: Mutex<PoolState>,
}

/// Rounds a request up to its size class: multiples of 256 bytes below 64 KiB,
/// then eight classes per power of two (at most 12.5% waste).
pub(crate) fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(4);
    if bytes <= 65536 {
        return bytes.div_ceil(256) * 256;
    }
    let pow = 63 - bytes.leading_zeros() as u64; // floor(log2)
    let step = 1u64 << (pow - 3);
    bytes.div_ceil(step) * step
}

impl BufferPool {
    /// Takes a free buffer of the class or returns `None` with the class size
    /// for the caller to create.
    pub(crate) fn take(&self, bytes: u64) -> (Option<wgpu::Buffer>, u64) {
        let class = size_class(bytes);
        let mut st = self.state.lock().expect("pool lock poisoned");
        let buf = st.free.get_mut(&class).and_then(Vec::pop);
        if buf.is_some() {
            st.stats.buffers_reused += 1;
            st.stats.live_bytes += class;
            st.stats.peak_live_bytes = st.stats.peak_live_bytes.max(st.stats.live_bytes);
        }
        (buf, class)
    }

    pub(crate) fn record_created(&self, class: u64) {
        let mut st = self.state.lock().expect("pool lock poisoned");
        st.stats.buffers_created += 1;
        st.stats.allocated_bytes += class;
        st.stats.live_bytes += class;
        st.stats.peak_allocated_bytes = st.stats.peak_allocated_bytes.max(st.stats.allocated_bytes);
        st.stats.peak_live_bytes = st.stats.peak_live_bytes.max(st.stats.live_bytes);
    }

    /// Returns a buffer of size class `class` (in plan mode the buffer itself
    /// is a stand-in smaller than its class).
    pub(crate) fn give_back(&self, buffer: wgpu::Buffer, class: u64) {
        let mut st = self.state.lock().expect("pool lock poisoned");
        st.stats.live_bytes -= class;
        st.free.entry(class).or_default().push(buffer);
    }

    pub(crate) fn stats(&self) -> PoolStats {
        self.state.lock().expect("pool lock poisoned").stats
    }

    /// Drops every free buffer (returns the memory to the driver).
    pub(crate) fn trim(&self) {
        let mut st = self.state.lock().expect("pool lock poisoned");
        let freed: u64 = st
            .free
            .iter()
            .map(|(class, list)| class * list.len() as u64)
            .sum();
        st.free.clear();
        st.stats.allocated_bytes -= freed;
    }

    pub(crate) fn reset_peaks(&self) {
        let mut st = self.state.lock().expect("pool lock poisoned");
        st.stats.peak_allocated_bytes = st.stats.allocated_bytes;
        st.stats.peak_live_bytes = st.stats.live_bytes;
    }
}

/// Buffers of packed matmul operands (`ops/matmul.rs`): bound as uniform
/// buffers, so they cannot come from the tensor pool. A buffer only goes
/// back to a request with the same byte count and layout `tag`: the op
/// relies on what earlier users of a layout left in its padding.
#[derive(Default)]
pub(crate) struct BlockPool {
    free: Mutex<HashMap<(u64, u64), Vec<wgpu::Buffer>>>,
}

impl BlockPool {
    /// A buffer of exactly `bytes` for layout `tag`, reused or new (zeroed).
    pub(crate) fn take(&self, device: &wgpu::Device, bytes: u64, tag: u64) -> wgpu::Buffer {
        let reused = self
            .free
            .lock()
            .expect("block pool lock poisoned")
            .get_mut(&(bytes, tag))
            .and_then(Vec::pop);
        reused.unwrap_or_else(|| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("motif packed operand"),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::UNIFORM,
                mapped_at_creation: false,
            })
        })
    }

    pub(crate) fn give_back(&self, buffer: wgpu::Buffer, tag: u64) {
        self.free
            .lock()
            .expect("block pool lock poisoned")
            .entry((buffer.size(), tag))
            .or_default()
            .push(buffer);
    }

    pub(crate) fn trim(&self) {
        self.free.lock().expect("block pool lock poisoned").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_cover_the_request_with_little_waste() {
        for bytes in [
            1u64,
            4,
            255,
            256,
            257,
            65536,
            65537,
            1 << 20,
            (1 << 20) + 1,
            152_000_000,
        ] {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            assert_eq!(c % 4, 0);
            assert!(
                c as f64 <= (bytes as f64 * 1.125).max(bytes as f64 + 255.0),
                "{bytes} -> {c}"
            );
        }
        assert_eq!(size_class(1 << 20), 1 << 20);
    }
}
