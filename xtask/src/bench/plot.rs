//! The plots: churn.png (the sweep, a line chart of achieved against offered churn rate per
//! tracer, with each tracer's CPU below it) and churn-max.png (a bar chart of the max-rate
//! rounds), drawn with `plotters` into an RGB buffer and encoded with the `png` crate.
//!
//! Text is rendered by ab_glyph from a TrueType font read at run time (FONT_PATHS): plotters'
//! own font lookup needs fontconfig. Without any of those fonts the charts are drawn without
//! text, and the bench says what to install.

use std::{fs, ops::Range, path::Path, sync::OnceLock};

use anyhow::{bail, Context as _, Result};
use plotters::{
    backend::RGBPixel,
    coord::{
        ranged1d::{DefaultFormatting, KeyPointHint},
        Shift,
    },
    element::ComposedElement,
    prelude::*,
    style::{
        register_font,
        text_anchor::{HPos, Pos, VPos},
    },
};

use super::{
    churn::{ChurnResult, ChurnSample, SweepResult},
    note,
    tracers::Cfg,
};

/// Where the chart font is looked for, in order: Debian's fonts-dejavu-core, then
/// fonts-liberation(2), then the Fedora/Arch layout of DejaVu.
const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];
/// The family name the font is registered under with plotters.
const FAMILY: &str = "portwatch-chart";
/// A family never registered: text drawn by mistake in a chart without text fails loudly.
const NO_FAMILY: &str = "portwatch-chart-none";

const INK: RGBColor = RGBColor(40, 40, 40);
const GRID: RGBColor = RGBColor(225, 225, 225);
/// The achieved = offered line, the break before the unpaced column, and the floor's colour.
const GREY: RGBColor = RGBColor(150, 150, 150);
/// The 97 % and 93 % targets in churn-max.png.
const GREEN_T: RGBColor = RGBColor(0, 150, 0);
const ORANGE_T: RGBColor = RGBColor(220, 140, 0);

/// Registers the first font of FONT_PATHS that loads (once per process); None if none does.
fn chart_font() -> Option<&'static str> {
    static FOUND: OnceLock<bool> = OnceLock::new();
    let found = *FOUND.get_or_init(|| {
        FONT_PATHS.iter().any(|p| {
            // plotters keeps fonts for the life of the process; the file is read once.
            fs::read(p).is_ok_and(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
            })
        })
    });
    found.then_some(FAMILY)
}

/// The text of a chart: the registered font, or no text at all.
#[derive(Clone, Copy)]
struct Lettering {
    on: bool,
}

impl Lettering {
    /// With the chart font if one loads; otherwise without text, and says so.
    fn for_chart(path: &Path) -> Lettering {
        let on = chart_font().is_some();
        if !on {
            note(&format!(
                "{}: no font for the chart's text (tried {}); drawing it without text. \
                 Install fonts-dejavu-core for labelled charts",
                path.display(),
                FONT_PATHS.join(", ")
            ));
        }
        Lettering { on }
    }
    fn style(self, size: f64, color: RGBColor, (h, v): Anchor) -> TextStyle<'static> {
        let family = if self.on { FAMILY } else { NO_FAMILY };
        FontDesc::new(FontFamily::Name(family), size, FontStyle::Normal)
            .color(&color)
            .pos(Pos::new(h, v))
    }
    /// `s` at pixel `at` of `area` (nothing without a font).
    fn put(self, area: &Area, s: &str, at: (i32, i32), (size, color, pos): Font) -> Result<()> {
        if self.on {
            area.draw_text(s, &self.style(size, color, pos), at)?;
        }
        Ok(())
    }
}

/// Where a text's anchor point is on it.
type Anchor = (HPos, VPos);
/// Size in pixels, colour, anchor.
type Font = (f64, RGBColor, Anchor);
const LEFT_TOP: Anchor = (HPos::Left, VPos::Top);
const LEFT_MID: Anchor = (HPos::Left, VPos::Center);
const CENTRE_TOP: Anchor = (HPos::Center, VPos::Top);
const CENTRE_BOTTOM: Anchor = (HPos::Center, VPos::Bottom);

type Area<'b> = DrawingArea<BitMapBackend<'b>, Shift>;
type Chart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<Axis, Axis>>;

/// Draws a `w` x `h` chart with `draw` and writes it to `path` as an 8-bit RGB PNG.
fn render(path: &Path, (w, h): (u32, u32), draw: impl FnOnce(&Area) -> Result<()>) -> Result<()> {
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let backend = BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut buf, (w, h))?;
        let root = backend.into_drawing_area();
        draw(&root)?;
        root.present()?;
    }
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut wr = enc.write_header().context("encoding the PNG header")?;
    wr.write_image_data(&buf).context("encoding the PNG data")?;
    wr.finish().context("finishing the PNG")?;
    fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// A linear axis over 0..end (`.0`) with grid lines and tick labels at `.1` (plotters' own
/// f64 axis chooses them itself).
struct Axis(f64, Vec<f64>);

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;
    fn map(&self, v: &f64, (lo, hi): (i32, i32)) -> i32 {
        if self.0 > 0.0 {
            lo + (v / self.0 * f64::from(hi - lo)).round() as i32
        } else {
            lo
        }
    }
    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.1.clone()
        }
    }
    fn range(&self) -> Range<f64> {
        0.0..self.0
    }
}

/// Multiples of `step` from 0 up to `top`: where the grid lines and tick labels go.
fn ticks(top: f64, step: f64) -> Vec<f64> {
    if step.is_nan() || step <= 0.0 || !top.is_finite() {
        return vec![0.0];
    }
    (0u32..=200)
        .map(|k| f64::from(k) * step)
        .take_while(|&g| g <= top)
        .collect()
}

/// A chart on `area` with the plot at the given margins (pixels: top, right, left label area,
/// bottom label area).
fn chart<'a, 'b>(
    area: &'a Area<'b>,
    margins: (u32, u32, u32, u32),
    x: Axis,
    y: Axis,
) -> Result<Chart<'a, 'b>> {
    let (top, right, left, bottom) = margins;
    Ok(ChartBuilder::on(area)
        .margin_top(top)
        .margin_right(right)
        .y_label_area_size(left)
        .x_label_area_size(bottom)
        .build_cartesian_2d(x, y)?)
}

/// Grid, axes, tick labels and the x axis' description; without a font, grid and axes only.
fn mesh(
    ch: &mut Chart,
    lt: Lettering,
    x_fmt: &dyn Fn(&f64) -> String,
    y_fmt: &dyn Fn(&f64) -> String,
    x_desc: Option<&str>,
) -> Result<()> {
    let label = lt.style(12.0, INK, LEFT_TOP);
    let mut m = ch.configure_mesh();
    m.bold_line_style(GRID)
        .axis_style(INK)
        .x_label_style(label.clone())
        .y_label_style(label.clone())
        .axis_desc_style(lt.style(13.0, INK, LEFT_TOP))
        .x_label_formatter(x_fmt)
        .y_label_formatter(y_fmt);
    if let Some(d) = x_desc.filter(|_| lt.on) {
        m.x_desc(d);
    }
    if !lt.on {
        m.disable_x_axis().disable_y_axis();
    }
    m.draw()?;
    if !lt.on {
        let (x, y) = (ch.x_range(), ch.y_range());
        let corner = vec![(x.start, y.end), (x.start, y.start), (x.end, y.start)];
        ch.draw_series(std::iter::once(PathElement::new(corner, INK)))?;
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Marker {
    Square,
    Disc,
    Diamond,
    Up,
    Down,
}

impl Marker {
    /// The shape's corners around (0, 0), about `r` pixels out.
    fn outline(self, r: i32) -> Vec<(i32, i32)> {
        match self {
            Marker::Square => vec![(-r, -r), (r, -r), (r, r), (-r, r)],
            Marker::Diamond => vec![(0, -r - 1), (r + 1, 0), (0, r + 1), (-r - 1, 0)],
            Marker::Up => vec![(0, -r), (r, r), (-r, r)],
            Marker::Down => vec![(0, r), (r, -r), (-r, -r)],
            Marker::Disc => (0..16)
                .map(|k| {
                    let a = f64::from(k) * std::f64::consts::PI / 8.0;
                    let r = f64::from(r);
                    ((r * a.cos()).round() as i32, (r * a.sin()).round() as i32)
                })
                .collect(),
        }
    }
}

type Mark<'b, C> = ComposedElement<C, BitMapBackend<'b>, Polygon<(i32, i32)>, Polygon<(i32, i32)>>;

/// A marker at `at`, filled, or `hollow` (only the outline: a point taken while the machine
/// was noisy). Shapes tell overlapping series apart.
fn marker<'b, C>(at: C, shape: Marker, color: RGBColor, hollow: bool) -> Mark<'b, C> {
    let inner = if hollow { WHITE } else { color };
    EmptyElement::at(at)
        + Polygon::new(shape.outline(5), color.filled())
        + Polygon::new(shape.outline(3), inner.filled())
}

/// Colour and marker of each configuration, the same in both plots.
fn style(c: Cfg) -> (RGBColor, Marker) {
    match c {
        Cfg::None => (RGBColor(120, 120, 120), Marker::Square),
        Cfg::Floor => (GREY, Marker::Square),
        Cfg::PwDefault => (RGBColor(30, 110, 200), Marker::Disc),
        Cfg::PwBaseline => (RGBColor(20, 60, 120), Marker::Disc),
        Cfg::PwAll => (RGBColor(90, 160, 230), Marker::Diamond),
        Cfg::PwBaselineAll => (RGBColor(40, 100, 150), Marker::Diamond),
        Cfg::Bpftrace => (RGBColor(200, 70, 60), Marker::Up),
        Cfg::Tcpstates => (RGBColor(230, 150, 60), Marker::Down),
    }
}

/// Names of a configuration: under its bar in churn-max.png, in the legend of churn.png.
fn names(c: Cfg) -> (&'static str, &'static str) {
    match c {
        Cfg::None => ("no tracer", "no tracer"),
        Cfg::PwDefault => ("portwatch", "portwatch (default)"),
        Cfg::PwBaseline => ("baseline", "portwatch baseline"),
        Cfg::PwAll => ("portwatch all", "portwatch --all-events"),
        Cfg::PwBaselineAll => ("baseline all", "portwatch baseline --all-events"),
        Cfg::Bpftrace => ("bpftrace", "bpftrace"),
        Cfg::Floor => ("floor", "floor"),
        Cfg::Tcpstates => ("tcpstates", "tcpstates"),
    }
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

/// churn-max.png: per configuration, a bar to the median connections/s of the max-rate
/// rounds with a dot per round, its value and share of no tracer's, and the 97 % and 93 %
/// targets.
pub(super) fn write_churn_png(path: &Path, churn: &ChurnResult) -> Result<()> {
    draw_churn_png(path, churn, Lettering::for_chart(path))
}

fn draw_churn_png(path: &Path, churn: &ChurnResult, lt: Lettering) -> Result<()> {
    let base = churn.median_rate(Cfg::None).context("no baseline")?;
    if base.is_nan() || base <= 0.0 {
        bail!("no baseline rate");
    }
    let rates = churn.samples.iter().flatten().map(|s| s.rate);
    let top = rates.fold(base, f64::max) * 1.15;
    let step = if top > 60_000.0 { 10_000.0 } else { 5_000.0 };
    let n = churn.cfgs.len() as f64;
    render(path, (900, 480), |root| {
        root.fill(&WHITE)?;
        let title = "Loopback TCP churn: connections/s (median, dots = rounds)";
        lt.put(root, title, (70, 18), (20.0, INK, LEFT_TOP))?;
        let (x_axis, y_axis) = (Axis(n, vec![]), Axis(top, ticks(top, step)));
        let mut ch = chart(root, (60, 20, 70, 80), x_axis, y_axis)?;
        mesh(&mut ch, lt, &|_| String::new(), &|&v| thousands(v), None)?;
        // Target lines: 97% and 93% of no tracer, labelled above and below their line.
        for (f, c, dy, v) in [
            (0.97, GREEN_T, -2, VPos::Bottom),
            (0.93, ORANGE_T, 3, VPos::Top),
        ] {
            let line = [(0.0, base * f), (n, base * f)];
            ch.draw_series(DashedLineSeries::new(line, 6, 4, c.stroke_width(1)))?;
            let (x, y) = ch.backend_coord(&(n, base * f));
            let pct = format!("{:.0}%", f * 100.0);
            lt.put(root, &pct, (x, y + dy), (12.0, c, (HPos::Right, v)))?;
        }
        for (i, &c) in churn.cfgs.iter().enumerate() {
            let Some(med) = churn.median_rate(c) else {
                continue;
            };
            let rounds = churn.samples.get(i).map_or(&[][..], Vec::as_slice);
            let x = i as f64;
            let bar = [(x + 0.2, 0.0), (x + 0.8, med)];
            ch.draw_series(std::iter::once(Rectangle::new(bar, style(c).0.filled())))?;
            let dots = rounds.iter().map(|s| {
                EmptyElement::at((x + 0.5, s.rate))
                    + Polygon::new(Marker::Square.outline(3), INK.filled())
            });
            ch.draw_series(dots)?;
            let high = rounds.iter().map(|s| s.rate).fold(med, f64::max);
            let (cx, y) = ch.backend_coord(&(x + 0.5, high));
            let val = format!("{:.0} ({:.1}%)", med, med / base * 100.0);
            lt.put(root, &val, (cx, y - 8), (12.0, INK, CENTRE_BOTTOM))?;
            let (_, y0) = ch.backend_coord(&(x, 0.0));
            lt.put(root, names(c).0, (cx, y0 + 12), (15.0, INK, CENTRE_TOP))?;
            if c.all_events() {
                let sub = "(--all-events)";
                lt.put(root, sub, (cx, y0 + 32), (13.0, INK, CENTRE_TOP))?;
            }
        }
        Ok(())
    })
}

/// The sweep's scales. Offered rates are plotted on 0..x_top; the unpaced (max) points sit in
/// a column of their own at `max_col`, past a break at `gap`, and the x axis ends at `x_end`.
struct SweepScale {
    x_top: f64,
    gap: f64,
    max_col: f64,
    x_end: f64,
    y_top: f64,
    cpu_top: f64,
    has_max: bool,
}

impl SweepScale {
    fn new(sw: &SweepResult) -> Result<SweepScale> {
        let x_hi = sw.rates.iter().flatten().copied().fold(0.0, f64::max);
        if x_hi <= 0.0 || sw.samples.is_empty() {
            bail!("no paced rates");
        }
        let all = || sw.samples.iter().flatten();
        let x_top = x_hi * 1.08;
        Ok(SweepScale {
            x_top,
            gap: x_top * 1.036,
            max_col: x_top * 1.079,
            x_end: x_top * 1.131,
            y_top: all().map(|x| x.rate).fold(x_hi, f64::max) * 1.1,
            cpu_top: all().filter_map(|x| x.tracer_cpu).fold(10.0, f64::max) * 1.15,
            has_max: sw.rates.iter().any(Option::is_none),
        })
    }
    /// The x axis, its grid at round offered rates and at the unpaced column.
    fn x_axis(&self) -> Axis {
        let mut k = ticks(self.x_top, grid_step(self.x_top));
        k.extend(self.has_max.then_some(self.max_col));
        Axis(self.x_end, k)
    }
    fn x_label(&self, v: f64) -> String {
        if self.has_max && (v - self.max_col).abs() < 1e-9 * self.max_col {
            "max".into()
        } else {
            thousands(v)
        }
    }
}

/// A plotted point: offered (x), value, and whether it was measured on a noisy machine.
type Pt = (f64, f64, bool);

/// churn.png: achieved connections/s against offered rate, one line per configuration, with
/// the ideal achieved = offered line; the unpaced (max) points sit in a column of their own at
/// the right. Below it, each tracer's CPU at the same rates.
pub(super) fn write_sweep_png(path: &Path, sw: &SweepResult) -> Result<()> {
    draw_sweep_png(path, sw, Lettering::for_chart(path))
}

fn draw_sweep_png(path: &Path, sw: &SweepResult, lt: Lettering) -> Result<()> {
    let sc = SweepScale::new(sw)?;
    render(path, (1020, 770), |root| {
        root.fill(&WHITE)?;
        let title = "Loopback TCP churn: achieved against offered rate";
        lt.put(root, title, (80, 14), (20.0, INK, LEFT_TOP))?;
        let (plots, legend) = root.split_horizontally(790);
        let (upper, lower) = plots.split_vertically(480);
        let xl = |v: &f64| sc.x_label(*v);

        let y_axis = Axis(sc.y_top, ticks(sc.y_top, grid_step(sc.y_top)));
        let mut ch = chart(&upper, (76, 20, 80, 30), sc.x_axis(), y_axis)?;
        mesh(&mut ch, lt, &xl, &|&v| thousands(v), None)?;
        lt.put(root, "Achieved conn/s", (20, 54), (14.0, INK, LEFT_TOP))?;
        // The ideal: every offered connection achieved.
        let ideal = [(0.0, 0.0), (sc.x_top, sc.x_top)];
        ch.draw_series(DashedLineSeries::new(ideal, 8, 6, GREY.stroke_width(2)))?;
        let mut noisy = sweep_panel(&mut ch, sw, &sc, |s| Some(s.rate), true)?;

        let y_axis = Axis(sc.cpu_top, ticks(sc.cpu_top, grid_step(sc.cpu_top)));
        let mut ch = chart(&lower, (68, 20, 80, 50), sc.x_axis(), y_axis)?;
        let x_desc = format!(
            "Offered conn/s ({} s per point, paced; max = unpaced)",
            sw.window.as_secs()
        );
        mesh(&mut ch, lt, &xl, &|v| format!("{v:.0}%"), Some(&x_desc))?;
        let cpu_title = "Tracer CPU, % of one core (tracer process only)";
        lt.put(root, cpu_title, (20, 526), (14.0, INK, LEFT_TOP))?;
        noisy |= sweep_panel(&mut ch, sw, &sc, |s| s.tracer_cpu, false)?;

        sweep_legend(&legend, lt, &sw.cfgs, noisy)
    })
}

/// One panel's lines: per configuration (but no tracer when `with_none` is false) its points at
/// the paced rates joined by a line, the unpaced point joined by a thin dashed one. Returns
/// whether any point plotted was noisy.
fn sweep_panel(
    ch: &mut Chart,
    sw: &SweepResult,
    sc: &SweepScale,
    value: impl Fn(&ChurnSample) -> Option<f64>,
    with_none: bool,
) -> Result<bool> {
    if sc.has_max {
        let brk = [(sc.gap, 0.0), (sc.gap, ch.y_range().end)];
        ch.draw_series(DashedLineSeries::new(brk, 3, 4, GREY.stroke_width(1)))?;
    }
    let mut any_noisy = false;
    for (ci, &c) in sw.cfgs.iter().enumerate() {
        if c == Cfg::None && !with_none {
            continue;
        }
        let (color, shape) = style(c);
        let at = |ri: usize| {
            let s = sw.samples.get(ri)?.get(ci)?;
            Some((sw.rates[ri].unwrap_or(sc.max_col), value(s)?, s.noisy))
        };
        let (paced, max): (Vec<usize>, Vec<usize>) =
            (0..sw.rates.len()).partition(|&ri| sw.rates[ri].is_some());
        let pts: Vec<Pt> = paced.into_iter().filter_map(at).collect();
        let max_pt = max.into_iter().find_map(at);
        let line = pts.iter().map(|p| (p.0, p.1));
        ch.draw_series(LineSeries::new(line, color.stroke_width(3)))?;
        if let (Some(last), Some(m)) = (pts.last(), max_pt) {
            let join = [(last.0, last.1), (m.0, m.1)];
            ch.draw_series(DashedLineSeries::new(join, 2, 3, color.stroke_width(1)))?;
        }
        let all: Vec<Pt> = pts.into_iter().chain(max_pt).collect();
        any_noisy |= all.iter().any(|p| p.2);
        ch.draw_series(all.iter().map(|&(x, y, n)| marker((x, y), shape, color, n)))?;
    }
    Ok(any_noisy)
}

/// The legend, right of the upper panel: each configuration's line and marker, the ideal
/// line, and the hollow marker of noisy points when there are any.
fn sweep_legend(area: &Area, lt: Lettering, cfgs: &[Cfg], noisy: bool) -> Result<()> {
    // The area's own pixels: x 0 is the left edge of the legend column.
    let (lx, tx) = (0, 34);
    let mut ly = 86;
    for &c in cfgs {
        let (color, shape) = style(c);
        let line = vec![(lx, ly), (lx + 26, ly)];
        area.draw(&PathElement::new(line, color.stroke_width(3)))?;
        area.draw(&marker((lx + 13, ly), shape, color, false))?;
        lt.put(area, names(c).1, (tx, ly), (13.0, INK, LEFT_MID))?;
        ly += 24;
    }
    let ideal = DashedLineSeries::new([(lx, ly), (lx + 26, ly)], 8, 6, GREY.stroke_width(2));
    for e in ideal {
        area.draw(&e)?;
    }
    lt.put(area, "achieved = offered", (tx, ly), (13.0, INK, LEFT_MID))?;
    if noisy {
        ly += 24;
        area.draw(&marker((lx + 13, ly), Marker::Square, INK, true))?;
        lt.put(area, "noisy point (see", (tx, ly), (13.0, INK, LEFT_MID))?;
        let more = "warnings in results.md)";
        lt.put(area, more, (tx, ly + 16), (13.0, INK, LEFT_MID))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
