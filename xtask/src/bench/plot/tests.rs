use std::{path::PathBuf, time::Duration};

use super::*;
use crate::bench::{churn::SWEEP_RATES, tracers::CONFIGS};

fn sample(rate: f64, cpu: Option<f64>) -> ChurnSample {
    ChurnSample {
        rate,
        failures: 0,
        tracer_cpu: cpu,
        other_cpu: Some(0.0),
        noisy: false,
        cpu_us_per_conn: None,
    }
}

/// Plausible sweep numbers: each configuration saturates at its own cap; bpftrace's
/// unpaced point is noisy.
fn sweep() -> SweepResult {
    let rates = SWEEP_RATES.to_vec();
    let caps = [23_500.0, 20_300.0, 14_700.0, 9_100.0, 12_400.0];
    let cpu_per_k = [0.0, 0.08, 1.4, 6.2, 4.0];
    let samples = rates
        .iter()
        .map(|r| {
            (0..CONFIGS.len())
                .map(|i| {
                    let got = r.map_or(caps[i], |r: f64| r.min(caps[i]) * 0.995);
                    let cpu = (i > 0).then(|| got / 1000.0 * cpu_per_k[i]);
                    let mut x = sample(got, cpu);
                    x.noisy = i == 3 && r.is_none();
                    x
                })
                .collect()
        })
        .collect();
    SweepResult {
        cfgs: CONFIGS.to_vec(),
        rates,
        window: Duration::from_secs(5),
        samples,
        lost: vec![0; CONFIGS.len()],
    }
}

/// Three max-rate rounds per configuration, the floor included.
fn churn() -> ChurnResult {
    let cfgs = vec![
        Cfg::None,
        Cfg::Floor,
        Cfg::PwDefault,
        Cfg::PwAll,
        Cfg::Bpftrace,
    ];
    let medians = [21_000.0, 20_500.0, 20_100.0, 16_800.0, 11_200.0];
    let samples = medians
        .iter()
        .map(|&m| {
            [0.97, 1.0, 1.02]
                .iter()
                .map(|f| sample(m * f, None))
                .collect()
        })
        .collect();
    ChurnResult::from_samples(cfgs, samples)
}

/// Where a test chart goes: BENCH_PLOT_OUT (a directory, kept) or a temporary one.
fn out_dir(test: &str) -> (PathBuf, bool) {
    match std::env::var_os("BENCH_PLOT_OUT") {
        Some(d) => (PathBuf::from(d), true),
        None => {
            let d = std::env::temp_dir().join(format!("plot-{test}-{}", std::process::id()));
            (d, false)
        }
    }
}

/// Renders into a fresh directory and decodes the PNG: (width, height, RGB pixels).
fn rendered(
    test: &str,
    file: &str,
    draw: impl FnOnce(&Path) -> Result<()>,
) -> (u32, u32, Vec<[u8; 3]>) {
    let (dir, keep) = out_dir(test);
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{test}-{file}"));
    draw(&path).unwrap();
    let mut dec = png::Decoder::new(std::io::BufReader::new(fs::File::open(&path).unwrap()))
        .read_info()
        .unwrap();
    let mut buf = vec![0; dec.output_buffer_size().unwrap()];
    let info = dec.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    if !keep {
        fs::remove_dir_all(&dir).unwrap();
    }
    let px = buf[..info.buffer_size()]
        .chunks(3)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    (info.width, info.height, px)
}

fn count(px: &[[u8; 3]], c: RGBColor) -> usize {
    px.iter().filter(|p| **p == [c.0, c.1, c.2]).count()
}

/// Dark pixels (text) in the rows y0..y1 of a `w` wide image.
fn ink_in_rows(px: &[[u8; 3]], w: u32, (y0, y1): (usize, usize)) -> usize {
    px[y0 * w as usize..y1 * w as usize]
        .iter()
        .filter(|p| p.iter().all(|&v| v < 100))
        .count()
}

/// Both charts' common checks: the size, more than the background, every series' colour.
fn check(img: &(u32, u32, Vec<[u8; 3]>), size: (u32, u32), colours: &[RGBColor], min: usize) {
    let (w, h, px) = img;
    assert_eq!((*w, *h), size);
    assert!(px.iter().any(|p| *p != px[0]), "the chart is one colour");
    for &c in colours {
        let n = count(px, c);
        assert!(n >= min, "{c:?}: {n} pixels, want at least {min}");
    }
}

#[test]
fn sweep_chart_shows_every_configuration() {
    let sw = sweep();
    let lt = Lettering::for_chart(Path::new("churn.png"));
    let img = rendered("sweep", "churn.png", |p| draw_sweep_png(p, &sw, lt));
    let colours: Vec<RGBColor> = sw.cfgs.iter().map(|&c| style(c).0).collect();
    check(&img, (1020, 770), &colours, 200);
    // The ideal line and the break are grey, the grid light grey.
    check(&img, (1020, 770), &[GREY, GRID], 200);
    if lt.on {
        assert!(ink_in_rows(&img.2, img.0, (10, 40)) > 100, "no title");
    }
}

#[test]
fn churn_chart_shows_bars_dots_and_targets() {
    let ch = churn();
    let lt = Lettering::for_chart(Path::new("churn-max.png"));
    let img = rendered("churn", "churn-max.png", |p| draw_churn_png(p, &ch, lt));
    // A bar is about 97 px wide and hundreds high.
    let bars: Vec<RGBColor> = ch.cfgs.iter().map(|&c| style(c).0).collect();
    check(&img, (900, 480), &bars, 10_000);
    let targets = [RGBColor(0, 150, 0), RGBColor(220, 140, 0)];
    check(&img, (900, 480), &targets, 200);
    // 15 dots of 7x7 pixels, less what text overlaps.
    assert!(count(&img.2, INK) >= 15 * 40);
    if lt.on {
        assert!(ink_in_rows(&img.2, img.0, (12, 44)) > 100, "no title");
    }
}

/// Without a font both charts are still drawn, with no text at all (any text would fail:
/// its family is never registered).
#[test]
fn charts_without_font_have_no_text() {
    let lt = Lettering { on: false };
    let sw = sweep();
    let img = rendered("nofont", "churn.png", |p| draw_sweep_png(p, &sw, lt));
    check(&img, (1020, 770), &[style(Cfg::PwDefault).0, GREY], 200);
    assert_eq!(ink_in_rows(&img.2, img.0, (0, 50)), 0);
    let ch = churn();
    let img = rendered("nofont", "churn-max.png", |p| draw_churn_png(p, &ch, lt));
    check(&img, (900, 480), &[style(Cfg::Bpftrace).0], 10_000);
    assert_eq!(ink_in_rows(&img.2, img.0, (0, 50)), 0);
}

#[test]
fn bad_results_are_errors() {
    let mut sw = sweep();
    sw.rates = vec![None];
    let dir = std::env::temp_dir();
    assert!(write_sweep_png(&dir.join("never.png"), &sw).is_err());
    let ch = ChurnResult::from_samples(vec![Cfg::PwDefault], vec![vec![sample(1.0, None)]]);
    assert!(write_churn_png(&dir.join("never.png"), &ch).is_err());
}

#[test]
fn sweep_x_axis_has_the_max_column() {
    let sc = SweepScale::new(&sweep()).unwrap();
    let Axis(end, keys) = sc.x_axis();
    assert_eq!(end, sc.x_end);
    assert_eq!(sc.x_label(*keys.last().unwrap()), "max");
    assert_eq!(sc.x_label(keys[1]), "5K");
    assert!(sc.x_top < sc.gap && sc.gap < sc.max_col && sc.max_col < sc.x_end);
}

#[test]
fn grid_steps_are_round() {
    assert_eq!(grid_step(25_000.0), 5_000.0);
    assert_eq!(grid_step(12.0), 2.0);
    assert_eq!(grid_step(70.0), 20.0);
    assert_eq!(ticks(12.0, 5.0), [0.0, 5.0, 10.0]);
    assert_eq!(ticks(12.0, 0.0), [0.0]);
}
