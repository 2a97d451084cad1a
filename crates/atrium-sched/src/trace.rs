//! The cluster and workload model of the openb traces: nodes with CPU,
//! memory and N GPUs of one model; pods asking CPU, memory, and either no
//! GPU, a share of one GPU (milli-GPU < 1000), or whole GPUs, optionally
//! restricted to some GPU models. Parsed from the traces' CSV text.

/// One machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub cpu_milli: u32,
    pub memory_mib: u32,
    pub gpus: u32,
    /// GPU model; empty for CPU-only nodes.
    pub model: String,
}

/// One pod's request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pod {
    pub cpu_milli: u32,
    pub memory_mib: u32,
    /// GPUs asked for: 0, or 1 with `gpu_milli` < 1000 (a share), or N
    /// whole GPUs with `gpu_milli` = 1000.
    pub num_gpu: u32,
    pub gpu_milli: u32,
    /// Acceptable GPU models; any when empty.
    pub gpu_spec: Vec<String>,
}

impl Pod {
    pub fn is_share(&self) -> bool {
        self.num_gpu == 1 && self.gpu_milli < 1000
    }

    /// Total GPU-milli this pod takes.
    pub fn gpu_request(&self) -> u64 {
        u64::from(self.num_gpu) * u64::from(self.gpu_milli)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

fn columns(header: &str, want: &[&str]) -> Result<Vec<usize>, ParseError> {
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    want.iter()
        .map(|w| {
            names.iter().position(|n| n == w).ok_or_else(|| ParseError {
                line: 1,
                message: format!("no column {w:?}"),
            })
        })
        .collect()
}

fn field<T: std::str::FromStr>(
    cells: &[&str],
    i: usize,
    line: usize,
    what: &str,
) -> Result<T, ParseError> {
    let raw = cells.get(i).copied().unwrap_or("").trim();
    raw.parse().map_err(|_| ParseError {
        line,
        message: format!("{what} {raw:?} is not a number"),
    })
}

/// Parses `sn,cpu_milli,memory_mib,gpu,model`.
pub fn parse_nodes(csv: &str) -> Result<Vec<NodeSpec>, ParseError> {
    let mut lines = csv.lines();
    let header = lines.next().ok_or(ParseError {
        line: 1,
        message: "empty file".into(),
    })?;
    let c = columns(header, &["sn", "cpu_milli", "memory_mib", "gpu", "model"])?;
    let mut out = Vec::new();
    for (i, l) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line = i + 2;
        let cells: Vec<&str> = l.split(',').collect();
        out.push(NodeSpec {
            name: cells.get(c[0]).copied().unwrap_or("").to_string(),
            cpu_milli: field(&cells, c[1], line, "cpu_milli")?,
            memory_mib: field(&cells, c[2], line, "memory_mib")?,
            gpus: field(&cells, c[3], line, "gpu")?,
            model: cells.get(c[4]).copied().unwrap_or("").trim().to_string(),
        });
    }
    Ok(out)
}

/// Parses `name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec,...]`
/// (`gpu_spec`, `|`-separated models, is optional: some traces lack it).
pub fn parse_pods(csv: &str) -> Result<Vec<Pod>, ParseError> {
    let mut lines = csv.lines();
    let header = lines.next().ok_or(ParseError {
        line: 1,
        message: "empty file".into(),
    })?;
    let c = columns(header, &["cpu_milli", "memory_mib", "num_gpu", "gpu_milli"])?;
    let spec_column = header
        .split(',')
        .map(str::trim)
        .position(|n| n == "gpu_spec");
    let mut out = Vec::new();
    for (i, l) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line = i + 2;
        let cells: Vec<&str> = l.split(',').collect();
        let num_gpu: u32 = field(&cells, c[2], line, "num_gpu")?;
        let gpu_milli: u32 = field(&cells, c[3], line, "gpu_milli")?;
        if gpu_milli > 1000
            || (num_gpu > 1 && gpu_milli != 1000)
            || (num_gpu == 0 && gpu_milli != 0)
        {
            return Err(ParseError {
                line,
                message: format!("{num_gpu} GPUs of {gpu_milli} milli is not a valid request"),
            });
        }
        let spec = spec_column
            .and_then(|i| cells.get(i).copied())
            .unwrap_or("");
        let mut gpu_spec: Vec<String> = spec
            .split('|')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        gpu_spec.sort();
        gpu_spec.dedup();
        out.push(Pod {
            cpu_milli: field(&cells, c[0], line, "cpu_milli")?,
            memory_mib: field(&cells, c[1], line, "memory_mib")?,
            num_gpu,
            gpu_milli,
            gpu_spec,
        });
    }
    Ok(out)
}

/// A pod with the trace's times, for the online replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedPod {
    pub name: String,
    pub pod: Pod,
    /// The trace's QoS class (LS, BE, Burstable, Guaranteed; may be empty).
    pub qos: String,
    /// Seconds from the trace's origin.
    pub created: u64,
    /// Seconds it ran for (deletion − creation).
    pub duration: u64,
}

/// Parses a pod list with `name`, `creation_time` and `deletion_time`
/// columns besides the request's (and `qos` when present).
pub fn parse_timed_pods(csv: &str) -> Result<Vec<TimedPod>, ParseError> {
    let pods = parse_pods(csv)?;
    let mut lines = csv.lines();
    let header = lines.next().unwrap_or("");
    let c = columns(header, &["name", "creation_time", "deletion_time"])?;
    let qos = header.split(',').map(str::trim).position(|n| n == "qos");
    let rows = lines.enumerate().filter(|(_, l)| !l.trim().is_empty());
    let mut out = Vec::with_capacity(pods.len());
    for ((i, l), pod) in rows.zip(pods) {
        let line = i + 2;
        let cells: Vec<&str> = l.split(',').collect();
        let created: u64 = field(&cells, c[1], line, "creation_time")?;
        let deleted: u64 = field(&cells, c[2], line, "deletion_time")?;
        let duration = deleted.checked_sub(created).ok_or_else(|| ParseError {
            line,
            message: format!("deletion_time {deleted} is before creation_time {created}"),
        })?;
        out.push(TimedPod {
            name: cells.get(c[0]).copied().unwrap_or("").trim().to_string(),
            pod,
            qos: qos
                .and_then(|q| cells.get(q))
                .map(|q| q.trim().to_string())
                .unwrap_or_default(),
            created,
            duration,
        });
    }
    Ok(out)
}

/// A 32-CPU, 64 GiB node with `gpus` T4s, for tests.
#[cfg(test)]
pub(crate) fn t4_node(name: &str, gpus: u32) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        cpu_milli: 32000,
        memory_mib: 65536,
        gpus,
        model: "T4".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_trace_rows_and_refuses_bad_ones() {
        let nodes =
            parse_nodes("sn,cpu_milli,memory_mib,gpu,model\nn0,64000,262144,2,P100\n").unwrap();
        assert_eq!(
            nodes[0],
            NodeSpec {
                name: "n0".into(),
                cpu_milli: 64000,
                memory_mib: 262144,
                gpus: 2,
                model: "P100".into()
            }
        );
        let pods = parse_pods(
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos\np0,12000,16384,1,460,,LS\np1,1000,1,2,1000,V100M32|V100M16,BE\n",
        )
        .unwrap();
        assert!(pods[0].is_share() && pods[0].gpu_request() == 460);
        assert_eq!(pods[1].gpu_spec, ["V100M16", "V100M32"]);
        assert_eq!(pods[1].gpu_request(), 2000);
        let bad =
            parse_pods("name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\np,1,1,2,500,\n")
                .unwrap_err();
        assert_eq!(bad.line, 2);
        assert!(parse_pods("cpu_milli\n1\n").is_err());
        let no_spec =
            parse_pods("name,cpu_milli,memory_mib,num_gpu,gpu_milli\np,1000,1,1,1000\n").unwrap();
        assert!(no_spec[0].gpu_spec.is_empty());
    }

    #[test]
    fn parses_times_and_refuses_a_task_that_ends_before_it_starts() {
        let head =
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,creation_time,deletion_time";
        let timed = parse_timed_pods(&format!("{head}\np0,1000,1,0,0,,BE,10,70\n")).unwrap();
        assert_eq!(
            (
                timed[0].name.as_str(),
                timed[0].qos.as_str(),
                timed[0].created,
                timed[0].duration
            ),
            ("p0", "BE", 10, 60)
        );
        let bad = parse_timed_pods(&format!(
            "{head}\np0,1000,1,0,0,,BE,10,70\np1,1,1,0,0,,LS,70,10\n"
        ))
        .unwrap_err();
        assert_eq!(bad.line, 3);
        assert!(
            parse_timed_pods("name,cpu_milli,memory_mib,num_gpu,gpu_milli\np,1,1,0,0\n").is_err()
        );
    }
}
