//! LEB128 integers, for compact stored records (view entries, the store's event feed).

/// Appends `v` in LEB128 (7 bits a byte, low first).
pub fn put(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

/// Reads a LEB128 integer at `*at`, moving `*at` past it; `None` if cut short or too long.
pub fn get(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        if shift == 63 && byte > 1 {
            return None; // more than 64 bits
        }
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Appends a signed integer, zigzag-encoded so that small magnitudes stay short.
pub fn put_signed(b: &mut Vec<u8>, v: i64) {
    put(b, ((v << 1) ^ (v >> 63)) as u64);
}

/// Reads what [`put_signed`] wrote.
pub fn get_signed(b: &[u8], at: &mut usize) -> Option<i64> {
    let z = get(b, at)?;
    Some(((z >> 1) as i64) ^ -((z & 1) as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_round_trip_and_cut_ones_are_refused() {
        for v in [0, 1, 127, 128, 300, u64::MAX] {
            let mut b = Vec::new();
            put(&mut b, v);
            assert_eq!(get(&b, &mut 0), Some(v));
            assert!(get(&b[..b.len() - 1], &mut 0).is_none());
        }
        for v in [0, -1, 1, i64::MIN, i64::MAX, 1_765_000_000_000] {
            let mut b = Vec::new();
            put_signed(&mut b, v);
            assert_eq!(get_signed(&b, &mut 0), Some(v));
        }
        assert!(get(&[0x80; 11], &mut 0).is_none());
        let mut over = vec![0xff; 9];
        over.push(0x02);
        assert!(get(&over, &mut 0).is_none());
    }
}
