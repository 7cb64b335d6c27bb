//! The plots: churn.png (the sweep, a line chart of achieved against offered churn rate per
//! tracer) and churn-max.png (a bar chart of the max-rate rounds), drawn on a tiny RGB
//! canvas with a 5x7 font and encoded with the `png` crate.

use std::{fs, path::Path};

use anyhow::{bail, Context as _, Result};

use super::{
    churn::{ChurnResult, SweepResult},
    tracers::{Cfg, CONFIGS},
};

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![[255, 255, 255]; w * h],
        }
    }
    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: [u8; 3]) {
        for y in y0.max(0)..y1.min(self.h as i64) {
            for x in x0.max(0)..x1.min(self.w as i64) {
                self.px[y as usize * self.w + x as usize] = c;
            }
        }
    }
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        let mut cx = x;
        for ch in s.chars() {
            let cols = glyph(ch.to_ascii_uppercase());
            for (i, col) in cols.iter().enumerate() {
                for row in 0..7 {
                    if col >> row & 1 == 1 {
                        let px = cx + i as i64 * scale;
                        let py = y + row * scale;
                        self.rect(px, py, px + scale, py + scale, c);
                    }
                }
            }
            cx += 6 * scale;
        }
    }
    fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 6 * scale
    }
    /// A straight line `thick` pixels wide; `dash`: (on, off) lengths in pixels, or solid.
    fn line(
        &mut self,
        (x0, y0): (i64, i64),
        (x1, y1): (i64, i64),
        thick: i64,
        dash: Option<(i64, i64)>,
        c: [u8; 3],
    ) {
        let (dx, dy) = (x1 - x0, y1 - y0);
        let n = dx.abs().max(dy.abs()).max(1);
        let h = thick / 2;
        for k in 0..=n {
            if dash.is_some_and(|(on, off)| k % (on + off) >= on) {
                continue;
            }
            let x = x0 + (dx * k + n / 2 * dx.signum()) / n;
            let y = y0 + (dy * k + n / 2 * dy.signum()) / n;
            self.rect(x - h, y - h, x - h + thick, y - h + thick, c);
        }
    }
    /// A filled marker about 2r+1 pixels across: shapes tell overlapping series apart.
    /// `hollow`: only the outline, for points taken while the machine was noisy.
    fn marker(&mut self, x: i64, y: i64, shape: Marker, c: [u8; 3], hollow: bool) {
        self.shape(x, y, shape, 5, c);
        if hollow {
            self.shape(x, y, shape, 3, [255, 255, 255]);
        }
    }
    fn shape(&mut self, x: i64, y: i64, shape: Marker, r: i64, c: [u8; 3]) {
        for oy in -r..=r {
            for ox in -r..=r {
                let inside = match shape {
                    Marker::Square => ox.abs() < r && oy.abs() < r,
                    Marker::Diamond => ox.abs() + oy.abs() <= r + 1,
                    Marker::Up => oy < r && 2 * ox.abs() <= oy + r,
                    Marker::Down => oy > -r && 2 * ox.abs() <= r - oy,
                    Marker::Disc => ox * ox + oy * oy <= r * r,
                };
                if inside {
                    self.rect(x + ox, y + oy, x + ox + 1, y + oy + 1, c);
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Marker {
    Square,
    Diamond,
    Up,
    Down,
    Disc,
}

/// Columns of a 5x7 glyph, bit 0 at the top (the classic HD44780-style font).
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [0x3E, 0x51, 0x49, 0x45, 0x3E],
        '1' => [0x00, 0x42, 0x7F, 0x40, 0x00],
        '2' => [0x42, 0x61, 0x51, 0x49, 0x46],
        '3' => [0x21, 0x41, 0x45, 0x4B, 0x31],
        '4' => [0x18, 0x14, 0x12, 0x7F, 0x10],
        '5' => [0x27, 0x45, 0x45, 0x45, 0x39],
        '6' => [0x3C, 0x4A, 0x49, 0x49, 0x30],
        '7' => [0x01, 0x71, 0x09, 0x05, 0x03],
        '8' => [0x36, 0x49, 0x49, 0x49, 0x36],
        '9' => [0x06, 0x49, 0x49, 0x29, 0x1E],
        'A' => [0x7E, 0x11, 0x11, 0x11, 0x7E],
        'B' => [0x7F, 0x49, 0x49, 0x49, 0x36],
        'C' => [0x3E, 0x41, 0x41, 0x41, 0x22],
        'D' => [0x7F, 0x41, 0x41, 0x22, 0x1C],
        'E' => [0x7F, 0x49, 0x49, 0x49, 0x41],
        'F' => [0x7F, 0x09, 0x09, 0x09, 0x01],
        'G' => [0x3E, 0x41, 0x49, 0x49, 0x7A],
        'H' => [0x7F, 0x08, 0x08, 0x08, 0x7F],
        'I' => [0x00, 0x41, 0x7F, 0x41, 0x00],
        'J' => [0x20, 0x40, 0x41, 0x3F, 0x01],
        'K' => [0x7F, 0x08, 0x14, 0x22, 0x41],
        'L' => [0x7F, 0x40, 0x40, 0x40, 0x40],
        'M' => [0x7F, 0x02, 0x0C, 0x02, 0x7F],
        'N' => [0x7F, 0x04, 0x08, 0x10, 0x7F],
        'O' => [0x3E, 0x41, 0x41, 0x41, 0x3E],
        'P' => [0x7F, 0x09, 0x09, 0x09, 0x06],
        'Q' => [0x3E, 0x41, 0x51, 0x21, 0x5E],
        'R' => [0x7F, 0x09, 0x19, 0x29, 0x46],
        'S' => [0x46, 0x49, 0x49, 0x49, 0x31],
        'T' => [0x01, 0x01, 0x7F, 0x01, 0x01],
        'U' => [0x3F, 0x40, 0x40, 0x40, 0x3F],
        'V' => [0x1F, 0x20, 0x40, 0x20, 0x1F],
        'W' => [0x3F, 0x40, 0x38, 0x40, 0x3F],
        'X' => [0x63, 0x14, 0x08, 0x14, 0x63],
        'Y' => [0x07, 0x08, 0x70, 0x08, 0x07],
        'Z' => [0x61, 0x51, 0x49, 0x45, 0x43],
        '%' => [0x23, 0x13, 0x08, 0x64, 0x62],
        '.' => [0x00, 0x60, 0x60, 0x00, 0x00],
        ',' => [0x00, 0x50, 0x30, 0x00, 0x00],
        '-' => [0x08, 0x08, 0x08, 0x08, 0x08],
        '/' => [0x20, 0x10, 0x08, 0x04, 0x02],
        ':' => [0x00, 0x36, 0x36, 0x00, 0x00],
        '(' => [0x00, 0x1C, 0x22, 0x41, 0x00],
        ')' => [0x00, 0x41, 0x22, 0x1C, 0x00],
        '=' => [0x14, 0x14, 0x14, 0x14, 0x14],
        '+' => [0x08, 0x08, 0x3E, 0x08, 0x08],
        ';' => [0x00, 0x56, 0x36, 0x00, 0x00],
        _ => [0; 5],
    }
}

pub(super) fn write_churn_png(path: &Path, churn: &ChurnResult) -> Result<()> {
    let base = churn.median_rate(Cfg::None).context("no baseline")?;
    let top = churn
        .samples
        .iter()
        .flatten()
        .map(|s| s.rate)
        .fold(base, f64::max)
        * 1.15;
    let (w, h) = (900usize, 480usize);
    let (left, right, plot_top, plot_bot) = (70i64, 880i64, 60i64, 400i64);
    let mut cv = Canvas::new(w, h);
    let ink = [40, 40, 40];
    cv.text(
        left,
        18,
        "LOOPBACK TCP CHURN: CONNECTIONS/S (MEDIAN, DOTS = ROUNDS)",
        2,
        ink,
    );
    let y_of = |v: f64| plot_bot - ((v / top) * (plot_bot - plot_top) as f64) as i64;
    // Axis, gridlines every 5000 conn/s.
    let step = if top > 60_000.0 { 10_000.0 } else { 5_000.0 };
    let mut g = 0.0;
    while g <= top {
        let y = y_of(g);
        cv.rect(left, y, right, y + 1, [225, 225, 225]);
        let lbl = format!("{}K", (g / 1000.0) as u64);
        cv.text(left - 8 - Canvas::text_width(&lbl, 1), y - 3, &lbl, 1, ink);
        g += step;
    }
    cv.rect(left, plot_top, left + 1, plot_bot, ink);
    cv.rect(left, plot_bot, right, plot_bot + 1, ink);
    // Target lines: 97% and 93% of no tracer.
    for (f, c) in [(0.97, [0, 150, 0]), (0.93, [220, 140, 0])] {
        let y = y_of(base * f);
        let mut x = left;
        while x < right {
            cv.rect(x, y, (x + 6).min(right), y + 1, c);
            x += 10;
        }
        let lbl = format!("{:.0}%", f * 100.0);
        cv.text(right - Canvas::text_width(&lbl, 1), y - 9, &lbl, 1, c);
    }
    let n = churn.cfgs.len() as i64;
    let slot = (right - left) / n;
    for (i, &c) in churn.cfgs.iter().enumerate() {
        let Some(med) = churn.median_rate(c) else {
            continue;
        };
        let x0 = left + slot * i as i64 + slot / 5;
        let x1 = x0 + slot * 3 / 5;
        let color = style(c).0;
        cv.rect(x0, y_of(med), x1, plot_bot, color);
        for s in &churn.samples[i] {
            let y = y_of(s.rate);
            let xm = (x0 + x1) / 2;
            cv.rect(xm - 3, y - 3, xm + 4, y + 4, ink);
        }
        let val = format!("{:.0} ({:.1}%)", med, med / base * 100.0);
        let cx = (x0 + x1) / 2;
        cv.text(
            cx - Canvas::text_width(&val, 1) / 2,
            y_of(med) - 14,
            &val,
            1,
            ink,
        );
        let name = match c {
            Cfg::None => "NO TRACER",
            Cfg::PwDefault => "PORTWATCH",
            Cfg::PwBaseline => "BASELINE",
            Cfg::PwAll => "PORTWATCH ALL",
            Cfg::Bpftrace => "BPFTRACE",
            Cfg::Floor => "FLOOR",
            Cfg::Tcpstates => "TCPSTATES",
        };
        cv.text(
            cx - Canvas::text_width(name, 2) / 2,
            plot_bot + 12,
            name,
            2,
            ink,
        );
        if c == Cfg::PwAll {
            let sub = "(--ALL-EVENTS)";
            cv.text(
                cx - Canvas::text_width(sub, 1) / 2,
                plot_bot + 32,
                sub,
                1,
                ink,
            );
        }
    }
    fs::write(path, encode_png(&cv)?).with_context(|| format!("writing {}", path.display()))
}

/// Colour and marker of each configuration, the same in both plots (index into CONFIGS).
const COLORS: [[u8; 3]; 5] = [
    [120, 120, 120],
    [30, 110, 200],
    [90, 160, 230],
    [200, 70, 60],
    [230, 150, 60],
];
const MARKERS: [Marker; 5] = [
    Marker::Square,
    Marker::Disc,
    Marker::Diamond,
    Marker::Up,
    Marker::Down,
];

fn style(c: Cfg) -> ([u8; 3], Marker) {
    if c == Cfg::Floor {
        return ([150, 150, 150], MARKERS[0]);
    }
    if c == Cfg::PwBaseline {
        return ([20, 60, 120], MARKERS[1]);
    }
    let k = CONFIGS.iter().position(|&x| x == c).unwrap_or(0);
    (COLORS[k], MARKERS[k])
}

/// A round grid step giving about 4-8 lines up to `top`.
fn grid_step(top: f64) -> f64 {
    let raw = top / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|f| f * mag)
        .find(|&st| st >= raw)
        .unwrap_or(10.0 * mag)
}

fn thousands(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v % 1000.0 == 0.0 {
        format!("{}K", (v / 1000.0) as u64)
    } else {
        format!("{:.1}K", v / 1000.0)
    }
}

/// A plotted point: pixel position, and whether it was measured on a noisy machine.
type Pt = (i64, i64, bool);

/// churn.png: achieved connections/s against offered rate, one line per configuration, with
/// the ideal achieved = offered line; the unpaced (max) points sit in a column of their own at
/// the right. Below it, each tracer's CPU at the same rates.
pub(super) fn write_sweep_png(path: &Path, sw: &SweepResult) -> Result<()> {
    let paced: Vec<(usize, f64)> = sw
        .rates
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.map(|r| (i, r)))
        .collect();
    let max_i = sw.rates.iter().position(std::option::Option::is_none);
    let x_hi = paced.iter().map(|p| p.1).fold(0.0, f64::max);
    if x_hi <= 0.0 || sw.samples.is_empty() {
        bail!("no paced rates");
    }
    let x_top = x_hi * 1.08;
    let y_top = sw
        .samples
        .iter()
        .flatten()
        .map(|x| x.rate)
        .fold(x_hi, f64::max)
        * 1.1;
    let cpu_top = sw
        .samples
        .iter()
        .flatten()
        .filter_map(|x| x.tracer_cpu)
        .fold(10.0, f64::max)
        * 1.15;

    let (w, h) = (1020usize, 770usize);
    let (left, right) = (80i64, 770i64);
    let (top1, bot1) = (76i64, 450i64);
    let (top2, bot2) = (548i64, 720i64);
    // Paced rates map onto [left, num_right]; the unpaced column sits at max_x.
    let num_right = right - 80;
    let max_x = right - 32;
    let ink = [40, 40, 40];
    let grid = [225, 225, 225];
    let mut cv = Canvas::new(w, h);
    cv.text(
        left,
        16,
        "LOOPBACK TCP CHURN: ACHIEVED AGAINST OFFERED RATE",
        2,
        ink,
    );
    let x_of = |v: f64| left + (v / x_top * (num_right - left) as f64).round() as i64;
    let y1_of = |v: f64| bot1 - (v / y_top * (bot1 - top1) as f64).round() as i64;
    let y2_of = |v: f64| bot2 - (v / cpu_top * (bot2 - top2) as f64).round() as i64;

    // Grids, axes and labels of both panels.
    let mut g = 0.0;
    let st = grid_step(y_top);
    while g <= y_top {
        let y = y1_of(g);
        cv.rect(left, y, right, y + 1, grid);
        let lbl = thousands(g);
        cv.text(left - 8 - Canvas::text_width(&lbl, 1), y - 3, &lbl, 1, ink);
        g += st;
    }
    let mut g = 0.0;
    let st = grid_step(cpu_top);
    while g <= cpu_top {
        let y = y2_of(g);
        cv.rect(left, y, right, y + 1, grid);
        let lbl = format!("{g:.0}%");
        cv.text(left - 8 - Canvas::text_width(&lbl, 1), y - 3, &lbl, 1, ink);
        g += st;
    }
    let mut g = 0.0;
    let st = grid_step(x_top);
    while g <= x_top {
        let x = x_of(g);
        for (t, b) in [(top1, bot1), (top2, bot2)] {
            cv.rect(x, t, x + 1, b, grid);
            let lbl = thousands(g);
            cv.text(x - Canvas::text_width(&lbl, 1) / 2, b + 8, &lbl, 1, ink);
        }
        g += st;
    }
    for (t, b) in [(top1, bot1), (top2, bot2)] {
        cv.rect(left, t, left + 1, b, ink);
        cv.rect(left, b, right, b + 1, ink);
        if max_i.is_some() {
            // The break between the paced axis and the unpaced column.
            cv.line(
                (max_x - 26, t),
                (max_x - 26, b),
                1,
                Some((3, 4)),
                [150, 150, 150],
            );
            cv.text(
                max_x - Canvas::text_width("MAX", 1) / 2,
                b + 8,
                "MAX",
                1,
                ink,
            );
        }
    }
    cv.text(left - 60, top1 - 22, "ACHIEVED CONN/S", 1, ink);
    cv.text(
        left - 60,
        top2 - 22,
        "TRACER CPU, % OF ONE CORE (TRACER PROCESS ONLY)",
        1,
        ink,
    );
    let xlabel = format!(
        "OFFERED CONN/S ({} S PER POINT, PACED; MAX = UNPACED)",
        sw.window.as_secs()
    );
    cv.text(
        (left + right) / 2 - Canvas::text_width(&xlabel, 1) / 2,
        bot2 + 26,
        &xlabel,
        1,
        ink,
    );

    // The ideal: every offered connection achieved.
    let ideal = [150, 150, 150];
    cv.line(
        (x_of(0.0), y1_of(0.0)),
        (x_of(x_top), y1_of(x_top)),
        2,
        Some((8, 6)),
        ideal,
    );

    // One line per configuration; the unpaced point joined by a dotted line.
    let mut any_noisy = false;
    for (ci, &c) in sw.cfgs.iter().enumerate() {
        let (color, mk) = style(c);
        // (x, y, noisy) per paced rate, then the unpaced point.
        let at = |ri: usize, x: i64, v: Option<f64>, y_of: &dyn Fn(f64) -> i64| {
            v.map(|v| (x, y_of(v), sw.samples[ri][ci].noisy))
        };
        let rate = |ri: usize| Some(sw.samples[ri][ci].rate);
        let cpu = |ri: usize| sw.samples[ri][ci].tracer_cpu;
        let mut series: Vec<(Vec<Pt>, Option<Pt>)> = Vec::new();
        series.push((
            paced
                .iter()
                .filter_map(|&(ri, r)| at(ri, x_of(r), rate(ri), &y1_of))
                .collect(),
            max_i.and_then(|ri| at(ri, max_x, rate(ri), &y1_of)),
        ));
        if c != Cfg::None {
            series.push((
                paced
                    .iter()
                    .filter_map(|&(ri, r)| at(ri, x_of(r), cpu(ri), &y2_of))
                    .collect(),
                max_i.and_then(|ri| at(ri, max_x, cpu(ri), &y2_of)),
            ));
        }
        for (pts, mx) in series {
            for p in pts.windows(2) {
                cv.line((p[0].0, p[0].1), (p[1].0, p[1].1), 3, None, color);
            }
            if let (Some(last), Some(m)) = (pts.last(), mx) {
                cv.line((last.0, last.1), (m.0, m.1), 1, Some((2, 3)), color);
            }
            for (x, y, noisy) in pts.into_iter().chain(mx) {
                any_noisy |= noisy;
                cv.marker(x, y, mk, color, noisy);
            }
        }
    }

    // Legend, right of the top panel.
    let lx = right + 20;
    let mut ly = top1 + 10;
    for &c in &sw.cfgs {
        let (color, mk) = style(c);
        cv.line((lx, ly), (lx + 26, ly), 3, None, color);
        cv.marker(lx + 13, ly, mk, color, false);
        let name = match c {
            Cfg::None => "NO TRACER",
            Cfg::PwDefault => "PORTWATCH (DEFAULT)",
            Cfg::PwBaseline => "PORTWATCH BASELINE",
            Cfg::PwAll => "PORTWATCH --ALL-EVENTS",
            Cfg::Bpftrace => "BPFTRACE",
            Cfg::Floor => "FLOOR",
            Cfg::Tcpstates => "TCPSTATES",
        };
        cv.text(lx + 34, ly - 3, name, 1, ink);
        ly += 22;
    }
    cv.line((lx, ly), (lx + 26, ly), 2, Some((8, 6)), ideal);
    cv.text(lx + 34, ly - 3, "ACHIEVED = OFFERED", 1, ink);
    if any_noisy {
        ly += 22;
        cv.marker(lx + 13, ly, Marker::Square, ink, true);
        cv.text(lx + 34, ly - 3, "NOISY POINT (SEE", 1, ink);
        cv.text(lx + 34, ly + 9, "WARNINGS IN RESULTS.MD)", 1, ink);
    }
    fs::write(path, encode_png(&cv)?).with_context(|| format!("writing {}", path.display()))
}

/// The canvas as an 8-bit RGB PNG, by the `png` crate.
fn encode_png(cv: &Canvas) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, cv.w as u32, cv.h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let data: Vec<u8> = cv.px.iter().flatten().copied().collect();
    let mut w = enc.write_header().context("encoding the PNG header")?;
    w.write_image_data(&data).context("encoding the PNG data")?;
    w.finish().context("finishing the PNG")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;
    use crate::bench::churn::{ChurnSample, SWEEP_RATES};

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

    /// The sweep plot renders from plausible numbers (set BENCH_PLOT_OUT to keep the file).
    #[test]
    fn sweep_png_renders() {
        let rates = SWEEP_RATES.to_vec();
        let caps = [23_500.0, 20_300.0, 14_700.0, 9_100.0, 12_400.0];
        let cpu_per_k = [0.0, 0.08, 1.4, 6.2, 4.0];
        let samples = rates
            .iter()
            .map(|r| {
                CONFIGS
                    .iter()
                    .enumerate()
                    .map(|(i, _)| {
                        let got = r.map_or(caps[i], |r: f64| r.min(caps[i]) * 0.995);
                        let cpu = (i > 0).then(|| got / 1000.0 * cpu_per_k[i]);
                        let mut x = sample(got, cpu);
                        x.noisy = i == 3 && r.is_none();
                        x
                    })
                    .collect()
            })
            .collect();
        let sw = SweepResult {
            cfgs: CONFIGS.to_vec(),
            rates,
            window: Duration::from_secs(5),
            samples,
            lost: vec![0; CONFIGS.len()],
        };
        let path = std::env::var_os("BENCH_PLOT_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::temp_dir().join(format!("sweep-{}.png", std::process::id()))
            });
        write_sweep_png(&path, &sw).unwrap();
        let png = fs::read(&path).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        if std::env::var_os("BENCH_PLOT_OUT").is_none() {
            let _ = fs::remove_file(&path);
        }
    }

    #[test]
    fn grid_steps_are_round() {
        assert_eq!(grid_step(25_000.0), 5_000.0);
        assert_eq!(grid_step(12.0), 2.0);
        assert_eq!(grid_step(70.0), 20.0);
    }
}
