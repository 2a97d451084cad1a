//! Trace variants made the way the FGD authors made theirs: "sampled from
//! the default one, emphasizing certain types of workloads" (the data set's
//! README). Their CPU-only variants (cpu050 … cpu250) keep every GPU task
//! of the default trace unchanged and draw the CPU-only tasks from the
//! default's CPU-only tasks, with replacement, until they are the asked
//! share of all tasks — checked against their published files: the GPU
//! tasks are the same multiset, and every CPU-only row is one of the
//! default's (cpu250 repeats one row eight times). Rows are renamed
//! `openb-pod-NNNN` (a drawn row may repeat) and ordered by creation time.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::trace::ParseError;

/// At most this many rows in a made trace: a share near 1 would ask for
/// an unbounded file.
pub const MAX_ROWS: usize = 1_000_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SampleError {
    #[error(transparent)]
    Row(#[from] ParseError),
    #[error("share {0} must be in [0, 1)")]
    Share(f64),
    #[error("share {0} would make more than {MAX_ROWS} rows")]
    TooMany(f64),
    #[error("the trace has no CPU-only task to draw from")]
    NoCpuTasks,
}

fn error(line: usize, message: impl Into<String>) -> SampleError {
    SampleError::Row(ParseError {
        line,
        message: message.into(),
    })
}

/// The pod list `csv` with its CPU-only tasks redrawn so they make up
/// `share` of all tasks (rounded up), reproducibly for a `seed`.
pub fn with_cpu_only_share(csv: &str, share: f64, seed: u64) -> Result<String, SampleError> {
    if !(0.0..1.0).contains(&share) {
        return Err(SampleError::Share(share));
    }
    let mut lines = csv.lines();
    let header = lines.next().ok_or_else(|| error(1, "empty file"))?;
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    let column = |want: &str| {
        names
            .iter()
            .position(|n| *n == want)
            .ok_or_else(|| error(1, format!("no column {want:?}")))
    };
    let name_col = column("name")?;
    let gpu_col = column("num_gpu")?;
    let created_col = names.iter().position(|n| *n == "creation_time");

    let mut gpu_rows: Vec<Vec<&str>> = Vec::new();
    let mut cpu_rows: Vec<Vec<&str>> = Vec::new();
    for (i, l) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let cells: Vec<&str> = l.split(',').collect();
        if cells.len() != names.len() {
            return Err(error(
                i + 2,
                format!("{} cells, the header has {}", cells.len(), names.len()),
            ));
        }
        let gpus: u32 = cells[gpu_col].trim().parse().map_err(|_| {
            error(
                i + 2,
                format!("num_gpu {:?} is not a number", cells[gpu_col]),
            )
        })?;
        if gpus == 0 {
            cpu_rows.push(cells);
        } else {
            gpu_rows.push(cells);
        }
    }
    // Rounded up, less a rounding error's worth (0.4 × 60 / 0.6 is 40).
    let wanted = (share * gpu_rows.len() as f64 / (1.0 - share) - 1e-9)
        .ceil()
        .max(0.0);
    if wanted + gpu_rows.len() as f64 > MAX_ROWS as f64 {
        return Err(SampleError::TooMany(share));
    }
    let wanted = wanted as usize;
    if wanted > 0 && cpu_rows.is_empty() {
        return Err(SampleError::NoCpuTasks);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let drawn = (0..wanted).map(|_| cpu_rows[rng.gen_range(0..cpu_rows.len())].clone());
    let mut rows: Vec<Vec<&str>> = gpu_rows.into_iter().chain(drawn).collect();
    if let Some(c) = created_col {
        // Stable: equal creation times keep GPU tasks first, draws in order.
        rows.sort_by_key(|r| r[c].trim().parse::<u64>().unwrap_or(u64::MAX));
    }
    let width = rows.len().to_string().len().max(4);
    let mut out = String::with_capacity(csv.len() * 2);
    out.push_str(header);
    out.push('\n');
    for (i, mut row) in rows.into_iter().enumerate() {
        let name = format!("openb-pod-{i:0width$}");
        row[name_col] = &name;
        out.push_str(&row.join(","));
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::parse_pods;

    const HEADER: &str = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,creation_time";

    fn trace() -> String {
        let mut s = format!("{HEADER}\n");
        for i in 0..60 {
            s.push_str(&format!("g{i},{},1024,1,1000,,{}\n", 1000 + i, 100 - i));
        }
        for i in 0..20 {
            s.push_str(&format!("c{i},{},2048,0,0,,{}\n", 50_000 + i, i));
        }
        s
    }

    #[test]
    fn keeps_gpu_tasks_and_draws_cpu_tasks_to_the_share() {
        let made = with_cpu_only_share(&trace(), 0.4, 7).unwrap();
        let pods = parse_pods(&made).unwrap();
        let cpu: Vec<_> = pods.iter().filter(|p| p.num_gpu == 0).collect();
        // 60 GPU tasks kept; 40 drawn: 40 / 100 is the share.
        assert_eq!(pods.len(), 100);
        assert_eq!(cpu.len(), 40);
        let mut gpu_cpu: Vec<u32> = pods
            .iter()
            .filter(|p| p.num_gpu > 0)
            .map(|p| p.cpu_milli)
            .collect();
        gpu_cpu.sort();
        assert_eq!(gpu_cpu, (1000..1060).collect::<Vec<_>>());
        assert!(cpu.iter().all(|p| (50_000..50_020).contains(&p.cpu_milli)));
        let distinct: std::collections::BTreeSet<u32> = cpu.iter().map(|p| p.cpu_milli).collect();
        assert!(distinct.len() < 20, "drawn with replacement");
        // Renamed in creation order, names unique.
        let rows: Vec<&str> = made.lines().skip(1).collect();
        assert!(rows[0].starts_with("openb-pod-0000,"));
        let created: Vec<u64> = rows
            .iter()
            .map(|r| r.rsplit(',').next().unwrap().parse().unwrap())
            .collect();
        assert!(created.windows(2).all(|w| w[0] <= w[1]));
        // Same seed, same file; another seed, another draw.
        assert_eq!(made, with_cpu_only_share(&trace(), 0.4, 7).unwrap());
        assert_ne!(made, with_cpu_only_share(&trace(), 0.4, 8).unwrap());
    }

    #[test]
    fn refuses_what_it_cannot_make() {
        for share in [-0.1, 1.0, f64::NAN, f64::INFINITY] {
            assert!(with_cpu_only_share(&trace(), share, 1).is_err(), "{share}");
        }
        assert_eq!(
            with_cpu_only_share(&trace(), 0.999_999_9, 1),
            Err(SampleError::TooMany(0.999_999_9))
        );
        let no_cpu = format!("{HEADER}\ng,1,1,1,1000,,1\n");
        assert_eq!(
            with_cpu_only_share(&no_cpu, 0.5, 1),
            Err(SampleError::NoCpuTasks)
        );
        let bad = with_cpu_only_share(&format!("{HEADER}\ng,1,1,x,1000,,1\n"), 0.5, 1);
        assert!(matches!(
            bad,
            Err(SampleError::Row(ParseError { line: 2, .. }))
        ));
        assert!(with_cpu_only_share("cpu_milli\n1\n", 0.5, 1).is_err());
    }
}
