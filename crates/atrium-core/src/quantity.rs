//! Resource quantities as tenants and operators write them, in the notation
//! Kubernetes made familiar: CPU as cores or millicores (`2`, `1.5`, `500m`),
//! bytes with binary or decimal suffixes (`16Gi`, `512Mi`, `1G`), GPUs as a
//! whole count (`2`), a fraction of one GPU (`0.5`, `250m`) or a MIG profile
//! (`3g.40gb`).
//!
//! Each type keeps an exact integer internally (millicores, bytes, milli-GPU)
//! so sums and quota checks never round. On the wire every quantity is a
//! string; plain JSON numbers are accepted on input for convenience.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a quantity string was refused; the message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {hint}")]
pub struct QuantityError {
    what: &'static str,
    input: String,
    hint: &'static str,
}

/// Parses a non-negative decimal with at most three fractional digits into
/// thousandths: `"1.5"` → 1500. Returns `None` on anything else.
fn parse_milli_decimal(s: &str) -> Option<u64> {
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    if !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if frac.len() > 3 {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut frac_milli: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().ok()?
    };
    for _ in frac.len()..3 {
        frac_milli *= 10;
    }
    whole.checked_mul(1000)?.checked_add(frac_milli)
}

/// Parses `"500m"` (thousandths) or a decimal (`"2"`, `"0.25"`) into thousandths.
fn parse_milli_quantity(s: &str) -> Option<u64> {
    match s.strip_suffix('m') {
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse().ok()
        }
        Some(_) => None,
        None => parse_milli_decimal(s),
    }
}

fn format_milli(milli: u64) -> String {
    if milli.is_multiple_of(1000) {
        format!("{}", milli / 1000)
    } else {
        format!("{milli}m")
    }
}

/// CPU in millicores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CpuMillis(pub u64);

impl CpuMillis {
    pub fn cores(n: u64) -> Self {
        Self(n * 1000)
    }
}

impl FromStr for CpuMillis {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_milli_quantity(s.trim())
            .map(CpuMillis)
            .ok_or_else(|| QuantityError {
                what: "CPU quantity",
                input: s.to_string(),
                hint: "use cores like \"2\" or \"1.5\", or millicores like \"500m\"",
            })
    }
}

impl fmt::Display for CpuMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_milli(self.0))
    }
}

/// An amount of GPU capacity in milli-GPU, for quotas and inventory sums
/// (`"8"` is eight GPUs, `"1.5"` one and a half).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GpuMilli(pub u64);

impl FromStr for GpuMilli {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_milli_quantity(s.trim())
            .map(GpuMilli)
            .ok_or_else(|| QuantityError {
                what: "GPU amount",
                input: s.to_string(),
                hint: "use GPUs like \"8\" or \"1.5\", or milli-GPU like \"500m\"",
            })
    }
}

impl fmt::Display for GpuMilli {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_milli(self.0))
    }
}

/// A size in bytes (memory, GPU memory, disk, storage).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

const BINARY_UNITS: [(&str, u64); 5] = [
    ("Pi", 1 << 50),
    ("Ti", 1 << 40),
    ("Gi", 1 << 30),
    ("Mi", 1 << 20),
    ("Ki", 1 << 10),
];
const DECIMAL_UNITS: [(&str, u64); 5] = [
    ("P", 1_000_000_000_000_000),
    ("T", 1_000_000_000_000),
    ("G", 1_000_000_000),
    ("M", 1_000_000),
    ("K", 1_000),
];

impl ByteSize {
    pub fn gib(n: u64) -> Self {
        Self(n << 30)
    }
}

impl FromStr for ByteSize {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || QuantityError {
            what: "byte quantity",
            input: s.to_string(),
            hint: "use a whole number of bytes or a suffix: Ki, Mi, Gi, Ti, Pi (binary) \
                   or K, M, G, T, P (decimal), e.g. \"16Gi\"",
        };
        let t = s.trim();
        let (digits, factor) = BINARY_UNITS
            .iter()
            .chain(DECIMAL_UNITS.iter())
            .find_map(|(suffix, factor)| t.strip_suffix(suffix).map(|d| (d, *factor)))
            .unwrap_or((t, 1));
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let n: u64 = digits.parse().map_err(|_| err())?;
        n.checked_mul(factor).map(ByteSize).ok_or_else(err)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suffix, factor) in BINARY_UNITS {
            if self.0 >= factor && self.0.is_multiple_of(factor) {
                return write!(f, "{}{suffix}", self.0 / factor);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A MIG (multi-instance GPU) profile such as `3g.40gb`: compute slices out
/// of seven, and memory in GB. Which profiles a GPU model offers, and where
/// they may be placed, is the scheduler's knowledge, not the domain's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MigProfile {
    pub compute_slices: u8,
    pub memory_gb: u16,
}

impl FromStr for MigProfile {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || QuantityError {
            what: "MIG profile",
            input: s.to_string(),
            hint: "use <slices>g.<memory>gb with 1, 2, 3, 4 or 7 slices, e.g. \"3g.40gb\"",
        };
        let (g, mem) = s.trim().split_once("g.").ok_or_else(err)?;
        let mem = mem.strip_suffix("gb").ok_or_else(err)?;
        let compute_slices: u8 = g.parse().map_err(|_| err())?;
        let memory_gb: u16 = mem.parse().map_err(|_| err())?;
        if ![1, 2, 3, 4, 7].contains(&compute_slices) || memory_gb == 0 {
            return Err(err());
        }
        Ok(MigProfile {
            compute_slices,
            memory_gb,
        })
    }
}

impl fmt::Display for MigProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}g.{}gb", self.compute_slices, self.memory_gb)
    }
}

/// What one replica asks of GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GpuRequest {
    /// Whole GPUs or a fraction of one, in milli-GPU: 2000 is two GPUs, 500
    /// half of one. Values above 1000 are always whole GPUs.
    Milli(u32),
    /// One MIG instance of this profile.
    Mig(MigProfile),
}

impl GpuRequest {
    /// GPU capacity this request takes, in milli-GPU. A MIG instance counts
    /// as its share of compute slices (of seven), rounded up, so quotas
    /// stay conservative.
    pub fn milli(&self) -> u64 {
        match self {
            GpuRequest::Milli(m) => u64::from(*m),
            GpuRequest::Mig(p) => (u64::from(p.compute_slices) * 1000).div_ceil(7),
        }
    }
}

impl FromStr for GpuRequest {
    type Err = QuantityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.contains("g.") {
            return t.parse().map(GpuRequest::Mig);
        }
        let err = |hint| QuantityError {
            what: "GPU quantity",
            input: s.to_string(),
            hint,
        };
        let milli = parse_milli_quantity(t).ok_or_else(|| {
            err(
                "use whole GPUs like \"2\", a fraction like \"0.5\" or \"250m\", \
                 or a MIG profile like \"3g.40gb\"",
            )
        })?;
        if milli > 1000 && !milli.is_multiple_of(1000) {
            return Err(err("more than one GPU must be a whole number of GPUs"));
        }
        if milli == 0 {
            return Err(err("must be more than zero; omit the field for no GPU"));
        }
        u32::try_from(milli)
            .map(GpuRequest::Milli)
            .map_err(|_| err("too many GPUs for one replica"))
    }
}

impl fmt::Display for GpuRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuRequest::Milli(m) => f.write_str(&format_milli(u64::from(*m))),
            GpuRequest::Mig(p) => p.fmt(f),
        }
    }
}

/// Serde glue shared by the quantity types: serialize with `Display`,
/// deserialize from a string (or, for convenience, a JSON number) with
/// `FromStr`, so the error names the accepted forms.
macro_rules! string_quantity_serde {
    ($ty:ty, $expecting:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$ty, E> {
                        self.visit_str(&v.to_string())
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$ty, E> {
                        self.visit_str(&v.to_string())
                    }
                    fn visit_f64<E: de::Error>(self, v: f64) -> Result<$ty, E> {
                        self.visit_str(&v.to_string())
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

string_quantity_serde!(CpuMillis, "a CPU quantity such as \"2\" or \"500m\"");
string_quantity_serde!(GpuMilli, "a GPU amount such as \"8\" or \"0.5\"");
string_quantity_serde!(ByteSize, "a byte quantity such as \"16Gi\"");
string_quantity_serde!(MigProfile, "a MIG profile such as \"3g.40gb\"");
string_quantity_serde!(
    GpuRequest,
    "a GPU quantity such as \"1\", \"0.5\" or \"3g.40gb\""
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_accepts_cores_decimals_and_millicores() {
        assert_eq!("2".parse::<CpuMillis>(), Ok(CpuMillis(2000)));
        assert_eq!("1.5".parse::<CpuMillis>(), Ok(CpuMillis(1500)));
        assert_eq!("0.125".parse::<CpuMillis>(), Ok(CpuMillis(125)));
        assert_eq!("250m".parse::<CpuMillis>(), Ok(CpuMillis(250)));
        for bad in ["", "m", "-1", "1.2345", "2 cores", "1e3", "."] {
            assert!(bad.parse::<CpuMillis>().is_err(), "{bad:?}");
        }
        assert_eq!(CpuMillis(1500).to_string(), "1500m");
        assert_eq!(CpuMillis(4000).to_string(), "4");
    }

    #[test]
    fn bytes_accept_binary_and_decimal_suffixes() {
        assert_eq!("16Gi".parse::<ByteSize>(), Ok(ByteSize(16 << 30)));
        assert_eq!("1G".parse::<ByteSize>(), Ok(ByteSize(1_000_000_000)));
        assert_eq!("1024".parse::<ByteSize>(), Ok(ByteSize(1024)));
        for bad in ["", "Gi", "1.5Gi", "12GB", "-1", "99999999999Pi"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?}");
        }
        assert_eq!(ByteSize(16 << 30).to_string(), "16Gi");
        assert_eq!(ByteSize(1000).to_string(), "1000");
    }

    #[test]
    fn gpu_accepts_whole_fraction_and_mig() {
        assert_eq!("2".parse::<GpuRequest>(), Ok(GpuRequest::Milli(2000)));
        assert_eq!("0.5".parse::<GpuRequest>(), Ok(GpuRequest::Milli(500)));
        assert_eq!("250m".parse::<GpuRequest>(), Ok(GpuRequest::Milli(250)));
        assert_eq!(
            "3g.40gb".parse::<GpuRequest>(),
            Ok(GpuRequest::Mig(MigProfile {
                compute_slices: 3,
                memory_gb: 40
            }))
        );
        for bad in ["0", "1.5", "5g.10gb", "3g.gb", "abc", "2500m"] {
            assert!(bad.parse::<GpuRequest>().is_err(), "{bad:?}");
        }
        assert_eq!(GpuRequest::Mig("1g.10gb".parse().unwrap()).milli(), 143);
    }

    #[test]
    fn serde_round_trips_and_accepts_numbers() {
        let v: CpuMillis = serde_json::from_str("2").unwrap();
        assert_eq!(v, CpuMillis(2000));
        let v: CpuMillis = serde_json::from_str("\"1.5\"").unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), "\"1500m\"");
        let err = serde_json::from_str::<ByteSize>("\"12GB\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid byte quantity \"12GB\""), "{err}");
    }
}
