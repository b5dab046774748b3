//! `report.html`: the report of a job as one page a person reads instead of `report.json` —
//! sizes before and after, the gates' verdict, per-layer charts of error, cosine and bits per
//! weight, the worst tensors, the time breakdown and the recipe.
//!
//! Self-contained on purpose: inline CSS and SVG, no script, no font or image to fetch, so it
//! opens the same from a bucket, a laptop or an air-gapped cluster. Every text from the job
//! (tensor and layer names, URLs, the recipe, notes) goes through [`escape`], and URLs through
//! `shardpress_store::redact` as well.

use std::collections::BTreeMap;
use std::fmt::Write;

use shardpress_store::redact;

use crate::report::{Report, TaskReport, TensorReport};

/// Object name of the page, beside `report.json`.
pub const REPORT_HTML_NAME: &str = "report.html";

/// How many of the worst tensors the page lists.
const WORST_TENSORS: usize = 20;

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;\
color:#1d2330;padding:0 1em}h1{font-size:22px;margin-bottom:.2em}h2{font-size:17px;\
margin-top:1.8em;border-bottom:1px solid #dde;padding-bottom:.2em}.sub{color:#556}\
table{border-collapse:collapse;width:100%;font-size:13px}th,td{text-align:left;padding:4px 8px;\
border-bottom:1px solid #e5e7eb}th{background:#f1f3f6}td.n{text-align:right;\
font-variant-numeric:tabular-nums}.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:\
#f6f7f9;border-radius:6px;padding:8px 12px;min-width:150px}.card b{display:block;font-size:18px}\
.ok{color:#1b7f3b}.bad{color:#b3261e}pre{background:#f6f7f9;padding:10px;overflow:auto;\
font-size:12px}.mono{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}\
svg{display:block;margin:.4em 0 1em}";

/// `text` safe inside HTML text and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page of `report`.
pub fn render(report: &Report) -> String {
    let mut page = String::with_capacity(64 * 1024);
    let title = format!("shardpress report — {}", report.job_id);
    let _ = write!(
        page,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        escape(&title),
        escape(&title)
    );
    let _ = writeln!(
        page,
        "<p class=\"sub mono\">{} → {}</p><p class=\"sub\">recipe <b>{}</b> ({}) · format {}</p>",
        escape(&redact(&report.model_url)),
        escape(&redact(&report.out_url)),
        escape(&report.recipe.name),
        escape(&report.recipe.description),
        escape(report.format),
    );
    summary_section(&mut page, report);
    layers_section(&mut page, report);
    worst_section(&mut page, &report.tensors);
    time_section(&mut page, report);
    let _ = writeln!(
        page,
        "<h2>Recipe</h2><pre>{}</pre>\n</body></html>",
        escape(&report.recipe.yaml)
    );
    page
}

/// `n` bytes in decimal units, `8.19 kB`, `1.50 GB` (reports of small test models too).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    let mut value = n as f64;
    let mut unit = "B";
    for next in UNITS {
        if value < 1000.0 {
            break;
        }
        value /= 1000.0;
        unit = next;
    }
    match unit {
        "B" => format!("{n} B"),
        _ => format!("{value:.2} {unit}"),
    }
}

/// A number for the page: finite values with `digits` decimals, else a dash.
fn num(value: Option<f64>, digits: usize) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "–".into(),
    }
}

fn card(page: &mut String, label: &str, value: &str) {
    let _ = write!(
        page,
        "<div class=\"card\">{}<b>{}</b></div>",
        escape(label),
        value
    );
}

fn summary_section(page: &mut String, report: &Report) {
    let s = &report.summary;
    page.push_str("<h2>Summary</h2><div class=\"cards\">");
    let ratio = match s.output_bytes {
        0 => "–".to_string(),
        out => format!("{:.2}×", s.input_bytes as f64 / out as f64),
    };
    card(page, "size before", &bytes(s.input_bytes));
    card(page, "size after", &bytes(s.output_bytes));
    card(page, "smaller by", &ratio);
    card(
        page,
        "tensors (compressed)",
        &format!("{} ({})", s.tensors, s.tensors_compressed),
    );
    card(page, "bits per weight", &num(Some(s.bits_per_weight), 3));
    card(
        page,
        "stored bits per weight",
        &num(s.stored_bits_per_weight, 3),
    );
    card(
        page,
        "rel. error (weighted)",
        &num(Some(s.rel_fro_error_weighted), 5),
    );
    let worst = s.worst_rel_fro_error.as_ref();
    card(page, "worst rel. error", &num(worst.map(|w| w.value), 5));
    card(
        page,
        "min cosine",
        &num(s.min_cosine.as_ref().map(|w| w.value), 5),
    );
    let gates = &report.gates;
    let verdict = match gates.passed {
        true => "<span class=\"ok\">passed</span>".to_string(),
        false => format!(
            "<span class=\"bad\">{} violations</span>",
            gates.violations.len()
        ),
    };
    card(page, "accuracy gates", &verdict);
    page.push_str("</div>\n");
    if !gates.violations.is_empty() {
        page.push_str("<table><tr><th>tensor</th><th>metric</th><th>value</th><th>limit</th></tr>");
        for v in gates.violations.iter().take(WORST_TENSORS) {
            let _ = write!(
                page,
                "<tr><td class=\"mono\">{}</td><td>{}</td><td class=\"n\">{}</td>\
                 <td class=\"n\">{}</td></tr>",
                escape(&v.tensor),
                escape(v.metric),
                num(Some(v.value), 5),
                num(Some(v.limit), 5)
            );
        }
        page.push_str("</table>\n");
    }
}

/// A bar chart of one value per label, as inline SVG (`title` on every bar says its value).
fn bar_chart(title: &str, labels: &[&str], values: &[f64], digits: usize, color: &str) -> String {
    let (width, height, left, bottom) = (1000.0, 140.0, 70.0, 20.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"100%\" viewBox=\"0 0 {width} {}\" \
         role=\"img\" aria-label=\"{}\"><text x=\"{left}\" y=\"14\" font-size=\"13\" \
         font-weight=\"600\">{}</text>",
        height + bottom + 24.0,
        escape(title),
        escape(title)
    );
    let finite = || values.iter().copied().filter(|v| v.is_finite());
    let max = finite().fold(0.0_f64, f64::max);
    let min = finite().fold(0.0_f64, f64::min).min(0.0);
    let span = if max - min > 0.0 { max - min } else { 1.0 };
    let top = 24.0;
    let y = |v: f64| top + height * (max - v) / span;
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{width}\" y2=\"{}\" stroke=\"#889\"/>\
         <text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{}</text>\
         <text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
        y(0.0),
        y(0.0),
        left - 4.0,
        top + 10.0,
        num(Some(max), digits),
        left - 4.0,
        top + height,
        num(Some(min), digits)
    );
    if values.is_empty() {
        let _ = write!(
            svg,
            "<text x=\"{left}\" y=\"{}\" font-size=\"12\">no layers</text>",
            top + 20.0
        );
    }
    let step = (width - left) / values.len().max(1) as f64;
    for (i, (label, value)) in labels.iter().zip(values).enumerate() {
        let v = if value.is_finite() { *value } else { 0.0 };
        let (y0, y1) = (y(v.max(0.0)), y(v.min(0.0)));
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{y0:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\">\
             <title>{}: {}</title></rect>",
            left + i as f64 * step + step * 0.1,
            (step * 0.8).max(0.5),
            (y1 - y0).max(0.5),
            escape(label),
            num(Some(*value), digits)
        );
    }
    // Label the first, middle and last bars (names like "layer 12" are too long for each).
    let marks = [0, labels.len() / 2, labels.len().saturating_sub(1)];
    for i in marks.into_iter().filter(|&i| i < labels.len()) {
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
            left + (i as f64 + 0.5) * step,
            top + height + 16.0,
            escape(labels[i])
        );
    }
    svg.push_str("</svg>");
    svg
}

fn layers_section(page: &mut String, report: &Report) {
    let layers = &report.layers;
    let labels: Vec<&str> = layers.iter().map(|l| l.layer.as_str()).collect();
    let series =
        |f: fn(&crate::report::LayerReport) -> f64| -> Vec<f64> { layers.iter().map(f).collect() };
    page.push_str("<h2>Per layer</h2>\n");
    let charts = [
        (
            "relative error (parameter-weighted)",
            series(|l| l.rel_fro_error_weighted),
            5,
            "#d9534f",
        ),
        (
            "worst relative error",
            series(|l| l.worst_rel_fro_error),
            5,
            "#e8a33d",
        ),
        (
            "1 − minimum cosine",
            series(|l| 1.0 - l.min_cosine),
            6,
            "#3a7bd5",
        ),
        (
            "bits per weight",
            series(|l| l.bits_per_weight),
            3,
            "#4a9d5b",
        ),
    ];
    for (title, values, digits, color) in charts {
        page.push_str(&bar_chart(title, &labels, &values, digits, color));
        page.push('\n');
    }
    page.push_str(
        "<table><tr><th>layer</th><th>tensors</th><th>params</th><th>bits/weight</th>\
         <th>rel. error (weighted)</th><th>worst rel. error</th><th>min cosine</th></tr>",
    );
    for l in layers {
        let _ = write!(
            page,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(&l.layer),
            l.tensors,
            l.params,
            num(Some(l.bits_per_weight), 3),
            num(Some(l.rel_fro_error_weighted), 5),
            num(Some(l.worst_rel_fro_error), 5),
            num(Some(l.min_cosine), 5)
        );
    }
    page.push_str("</table>\n");
}

fn worst_section(page: &mut String, tensors: &[TensorReport]) {
    let mut worst: Vec<&TensorReport> = tensors
        .iter()
        .filter(|t| t.rel_fro_error.is_some())
        .collect();
    worst.sort_by(|a, b| {
        b.rel_fro_error
            .partial_cmp(&a.rel_fro_error)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    page.push_str("<h2>Worst tensors</h2>");
    if worst.is_empty() {
        page.push_str("<p class=\"sub\">no tensor was transformed</p>\n");
        return;
    }
    page.push_str(
        "<table><tr><th>tensor</th><th>pass</th><th>shape</th><th>bits/weight</th>\
         <th>rel. error</th><th>cosine</th><th>SNR dB</th><th>note</th></tr>",
    );
    for t in worst.into_iter().take(WORST_TENSORS) {
        let shape: Vec<String> = t.shape.iter().map(u64::to_string).collect();
        let _ = write!(
            page,
            "<tr><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            escape(&t.name),
            escape(&t.pass),
            shape.join("×"),
            num(Some(t.bits_per_weight), 3),
            num(t.rel_fro_error, 5),
            num(t.cosine, 5),
            num(t.snr_db, 1),
            escape(&t.note)
        );
    }
    page.push_str("</table>\n");
}

/// Worker-seconds spent reading, computing and writing, in total and per worker.
fn time_section(page: &mut String, report: &Report) {
    let s = &report.summary;
    let _ = write!(
        page,
        "<h2>Time</h2><p>{} s wall clock{} · {} tasks on {} workers · {} retries · {} MB/s read</p>",
        num(Some(s.wall_seconds), 1),
        match s.measuring_seconds {
            Some(m) => format!(" (measuring round {} s)", num(Some(m), 1)),
            None => String::new(),
        },
        report.tasks.len(),
        s.workers_used,
        s.task_retries,
        num(Some(s.input_mb_per_second), 1)
    );
    let mut per_worker: BTreeMap<&str, [f64; 3]> = BTreeMap::new();
    let tasks = report.measuring_tasks.iter().chain(&report.tasks);
    for t in tasks.filter(|t| !t.restored) {
        let sum = per_worker.entry(t.worker.as_str()).or_default();
        for (total, part) in sum.iter_mut().zip(phases(t)) {
            *total += part;
        }
    }
    let mut all = [0.0; 3];
    for sums in per_worker.values() {
        for (total, part) in all.iter_mut().zip(sums) {
            *total += part;
        }
    }
    page.push_str(&stacked_bar(&all));
    page.push_str(
        "<table><tr><th>worker</th><th>read s</th><th>compute s</th><th>write s</th></tr>",
    );
    for (worker, [read, compute, write]) in per_worker.iter().map(|(w, s)| (w, *s)) {
        let _ = write!(
            page,
            "<tr><td>{}</td><td class=\"n\">{:.2}</td><td class=\"n\">{:.2}</td>\
             <td class=\"n\">{:.2}</td></tr>",
            escape(worker),
            read,
            compute,
            write
        );
    }
    page.push_str("</table>\n");
}

fn phases(task: &TaskReport) -> [f64; 3] {
    [task.read_seconds, task.compute_seconds, task.write_seconds].map(|s| {
        if s.is_finite() {
            s.max(0.0)
        } else {
            0.0
        }
    })
}

/// One horizontal bar split into read, compute and write time, with a legend.
fn stacked_bar(parts: &[f64; 3]) -> String {
    let total: f64 = parts.iter().sum();
    let mut svg = String::from(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"100%\" viewBox=\"0 0 1000 50\" \
         role=\"img\" aria-label=\"time breakdown\">",
    );
    let names = ["read", "compute", "write"];
    let colors = ["#3a7bd5", "#e8a33d", "#4a9d5b"];
    let mut x = 0.0;
    for (i, ((name, color), part)) in names.iter().zip(colors).zip(parts).enumerate() {
        let w = if total > 0.0 {
            1000.0 * part / total
        } else {
            0.0
        };
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"0\" width=\"{w:.1}\" height=\"22\" fill=\"{color}\">\
             <title>{name}: {part:.2} s</title></rect><rect x=\"{}\" y=\"32\" width=\"12\" \
             height=\"12\" fill=\"{color}\"/><text x=\"{}\" y=\"43\" font-size=\"12\">{name} \
             {part:.1} s</text>",
            i * 200,
            i * 200 + 16,
        );
        x += w;
    }
    if total == 0.0 {
        svg.push_str("<rect x=\"0\" y=\"0\" width=\"1000\" height=\"22\" fill=\"#e3e6ea\"/>");
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests;
