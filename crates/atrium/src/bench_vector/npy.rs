//! Reads a 2-D little-endian float32 `.npy` (NumPy's format, version 1–3),
//! either row-major or column-major (`fortran_order`), into rows.

use std::path::Path;

use anyhow::{bail, Context, Result};

pub fn read_f32_matrix(path: &Path) -> Result<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    parse(&bytes).with_context(|| format!("reading {}", path.display()))
}

fn parse(bytes: &[u8]) -> Result<Vec<Vec<f32>>> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("not a .npy file");
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => bail!(".npy version {v} is not supported"),
    };
    let end = start.checked_add(header_len).filter(|e| *e <= bytes.len());
    let Some(end) = end else {
        bail!("the .npy header runs past the file");
    };
    let header = std::str::from_utf8(&bytes[start..end]).context("the .npy header")?;
    if !header.contains("'descr': '<f4'") {
        bail!("expected little-endian float32 ('<f4'), the header says {header}");
    }
    let fortran = header.contains("'fortran_order': True");
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .context("the header has no shape")?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("the shape")?;
    let [rows, cols] = dims[..] else {
        bail!("expected a 2-D array, the shape is ({shape})");
    };
    let data = &bytes[end..];
    if data.len() != rows.saturating_mul(cols).saturating_mul(4) {
        bail!(
            "{} data bytes for a {rows}x{cols} float32 array",
            data.len()
        );
    }
    let at = |i: usize| {
        let b = &data[i * 4..i * 4 + 4];
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    };
    Ok((0..rows)
        .map(|r| {
            (0..cols)
                .map(|c| {
                    if fortran {
                        at(c * rows + r)
                    } else {
                        at(r * cols + c)
                    }
                })
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(header: &str, values: &[f32]) -> Vec<u8> {
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        out
    }

    #[test]
    fn reads_both_orders_and_refuses_what_it_cannot() {
        let c = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &[1., 2., 3., 4., 5., 6.],
        );
        assert_eq!(parse(&c).unwrap(), vec![vec![1., 2., 3.], vec![4., 5., 6.]]);
        let f = npy(
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
            &[1., 4., 2., 5., 3., 6.],
        );
        assert_eq!(parse(&f).unwrap(), vec![vec![1., 2., 3.], vec![4., 5., 6.]]);
        let short = npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &[1.],
        );
        assert!(parse(&short)
            .unwrap_err()
            .to_string()
            .contains("data bytes"));
        let f8 = npy(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 1), }",
            &[0., 0.],
        );
        assert!(parse(&f8).is_err());
        assert!(parse(b"nonsense").is_err());
    }
}
