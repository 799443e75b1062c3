//! Durations as people read them in error messages ("1.5s", "30s", "15min").

use std::time::Duration;

pub(crate) fn duration_text(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 10.0 {
        format!("{secs:.1}s")
    } else if secs < 600.0 || !d.as_secs().is_multiple_of(60) {
        format!("{}s", d.as_secs())
    } else {
        format!("{}min", d.as_secs() / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_naturally() {
        assert_eq!(duration_text(Duration::from_millis(1500)), "1.5s");
        assert_eq!(duration_text(Duration::from_secs(30)), "30s");
        assert_eq!(duration_text(Duration::from_secs(1800)), "30min");
        assert_eq!(duration_text(Duration::from_secs(1801)), "1801s");
    }
}
