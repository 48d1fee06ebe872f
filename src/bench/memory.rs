//! Resident memory from `/proc`: a process's peak (`VmHWM`), resetting this
//! process's peak before a measurement, the machine's total, and its load.

use serde::Serialize;

/// Peak resident memory of the worker in the sections that load it.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    /// Section 1: peak RSS of this process while the in-process consumer
    /// and intake took the orders (MiB), when `/proc` could tell.
    pub intake_peak_rss_mib: Option<f64>,
    /// Section 3: peak RSS of the `holdclear run` process (MiB).
    pub end_to_end_peak_rss_mib: Option<f64>,
    /// The bar, MiB.
    pub target_mib: f64,
}

/// The target of section 5, MiB.
pub const TARGET_MIB: f64 = 100.0;

/// `VmHWM` (peak resident set) of process `pid` (`"self"` for this one), MiB.
pub fn peak_rss_mib(pid: &str) -> Option<f64> {
    status_kib(pid, "VmHWM:").map(|kib| kib as f64 / 1024.0)
}

/// Resets this process's `VmHWM` to its current resident set (Linux:
/// writing `5` to `/proc/self/clear_refs`); false when not allowed.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `MemTotal` of the machine, MiB.
pub fn mem_total_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    field_kib(&text, "MemTotal:").map(|kib| kib / 1024)
}

/// The 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field_kib(&text, field)
}

fn field_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_fields() {
        let text = "Name:\tholdclear\nVmHWM:\t   51200 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(field_kib(text, "VmHWM:"), Some(51200));
        assert_eq!(field_kib(text, "VmSwap:"), None);
        assert!(peak_rss_mib("self").is_some_and(|m| m > 0.0));
    }
}
