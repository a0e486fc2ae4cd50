//! Drawing the dashboard: a pure function of an [`App`] (and the command pane's emulated
//! screen). Nothing here changes state; each part of the screen is a small widget that
//! implements `Widget for &T`, so it can be tested on its own against an expected buffer.
//!
//! Only the visible rows of a table are turned into ratatui rows, so drawing costs the
//! same with 10 flows or 10,000.

use ratatui::{
    Frame,
    buffer::Buffer,
    layout::{Constraint, Rect},
    style::{Color, Modifier, Style, Stylize},
    text::{Line, Span},
    widgets::{
        Block, Borders, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState, Widget, Wrap,
    },
};

use super::{
    app::{App, Focus, Group, SortKey, View},
    format,
    history::Rate,
    model::FlowRow,
};

const DIM: Style = Style::new().fg(Color::DarkGray);
const KEY: Style = Style::new().add_modifier(Modifier::BOLD);
const ALERT: Style = Style::new().fg(Color::White).bg(Color::Red).add_modifier(Modifier::BOLD);
const TITLE: Style = Style::new().add_modifier(Modifier::BOLD);
const SELECTED: Style = Style::new().add_modifier(Modifier::REVERSED);

impl App {
    /// Draws the whole screen. `command` is the command pane's emulated terminal, if any.
    pub fn render(&self, frame: &mut Frame, command: Option<&vt100::Screen>) {
        self.render_to(frame.area(), frame.buffer_mut(), command);
    }

    /// [`App::render`] into a buffer (what `render` does with the frame's).
    pub fn render_to(&self, area: Rect, buf: &mut Buffer, command: Option<&vt100::Screen>) {
        let layout = super::app::Layout::new(area, self.has_command, self.focus == Focus::Command);
        Header { app: self }.render(layout.header, buf);
        match (self.view, self.detail_flow()) {
            (View::Flows, Some(flow)) => Detail { app: self, flow }.render(layout.body, buf),
            (View::Flows, None) => FlowsTable { app: self }.render(layout.body, buf),
            (_, _) => GroupsTable { app: self }.render(layout.body, buf),
        }
        if let Some(rect) = layout.command {
            CommandPane { app: self, screen: command }.render(rect, buf);
        }
        Footer { app: self }.render(layout.footer, buf);
        if self.help {
            Help.render(area, buf);
        }
    }
}

/// The last `width` values of a rate timeline, for a sparkline.
fn spark_data(timeline: &[Rate], width: u16, pick: impl Fn(&Rate) -> f64) -> Vec<u64> {
    let skip = timeline.len().saturating_sub(width as usize);
    timeline[skip..].iter().map(|r| pick(r).round() as u64).collect()
}

/// Command line, backend, elapsed time and status; totals and rates; the run's chart.
pub struct Header<'a> {
    pub app: &'a App,
}

impl Widget for &Header<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let app = self.app;
        let snap = &app.snapshot;
        let run = &snap.run;
        let ended = app.command_ended();
        let elapsed = ended.map_or(app.now, |e| e.ts).saturating_sub(run.started);
        let status = match ended {
            Some(end) => Span::styled(format!("ended: {}", end.status), TITLE),
            None => Span::raw("running"),
        };
        // Status first: a long command line is cut at the right edge, not the status.
        let first = vec![
            Span::styled(" childflow ", TITLE.fg(Color::Cyan)),
            Span::raw(format::clock(elapsed)),
            Span::styled(" │ ", DIM),
            status,
            Span::styled(" │ ", DIM),
            Span::raw(run.backend.clone()),
            Span::styled(" │ ", DIM),
            Span::raw(run.command.join(" ")).bold(),
        ];
        let mut first = first;
        if app.paused {
            first.push(Span::raw(" "));
            first.push(Span::styled(" PAUSED ", ALERT.bg(Color::Yellow).fg(Color::Black)));
        }
        let rate = app.run_rate();
        let mut second = vec![
            Span::styled(" ↑ ", KEY),
            Span::raw(format!(
                "{} {}",
                format::bytes(snap.totals.bytes_out),
                format::rate(rate.out)
            )),
            Span::styled("  ↓ ", KEY),
            Span::raw(format!(
                "{} {}",
                format::bytes(snap.totals.bytes_in),
                format::rate(rate.r#in)
            )),
            Span::styled(" │ ", DIM),
            Span::raw(format!("flows {}/{}", snap.live_flows(), snap.flows_total)),
            Span::styled(" │ ", DIM),
            Span::raw(format!("names {}", snap.dns_names)),
        ];
        let alert = |label: &str, n: u64| {
            if n == 0 {
                Span::styled(format!("{label} 0"), DIM)
            } else {
                Span::styled(format!(" {label} {} ", format::count(n)), ALERT)
            }
        };
        second.push(Span::styled(" │ ", DIM));
        second.push(alert("drops", snap.dropped()));
        second.push(Span::raw(" "));
        second.push(alert("evicted", snap.evictions));
        let lines = [Line::from(first), Line::from(second)];
        for (i, line) in lines.iter().enumerate().take(area.height as usize) {
            line.render(Rect { y: area.y + i as u16, height: 1, ..area }, buf);
        }
        if area.height < 3 {
            return;
        }
        // Third row: the run's throughput, and the selected flow's next to it.
        let row = Rect { y: area.y + 2, height: 1, ..area };
        let half = row.width / 2;
        let run_timeline = app.history.run().map(|s| s.timeline()).unwrap_or_default();
        chart_row(" run ", &run_timeline, Rect { width: half, ..row }, buf);
        if let Some(flow) = app.selected() {
            let timeline = app.history.flow(flow.id).map(|s| s.timeline()).unwrap_or_default();
            let label = format!(" #{} ", flow.id);
            chart_row(
                &label,
                &timeline,
                Rect { x: row.x + half, width: row.width - half, ..row },
                buf,
            );
        }
    }
}

/// `label` then a one-row sparkline of total throughput.
fn chart_row(label: &str, timeline: &[Rate], area: Rect, buf: &mut Buffer) {
    let label_w = (label.chars().count() as u16).min(area.width);
    Span::styled(label, DIM).render(Rect { width: label_w, ..area }, buf);
    let spark = Rect { x: area.x + label_w, width: area.width - label_w, ..area };
    let data = spark_data(timeline, spark.width.saturating_sub(1), |r| r.total());
    Sparkline::default().data(&data).style(Style::new().fg(Color::Green)).render(spark, buf);
}

/// The title line above a table: view, counts, sort, filter and scope.
fn title_line(app: &App, count: usize) -> Line<'static> {
    let mut spans = vec![
        Span::styled(format!(" {} ", app.view.title()), TITLE),
        Span::raw(count.to_string()),
        Span::styled(" · sort ", DIM),
        Span::raw(app.sort.key_and_label().1),
    ];
    if let Some(scope) = &app.scope {
        spans.push(Span::styled(" · only ", DIM));
        spans.push(Span::styled(scope.key.clone(), KEY));
    }
    if !app.filter.is_empty() || app.filter_editing {
        spans.push(Span::styled(" · filter ", DIM));
        spans.push(Span::styled(format!("/{}", app.filter), KEY.fg(Color::Yellow)));
    }
    spans.push(Span::raw(" "));
    Line::from(spans)
}

fn short_state(state: &str) -> &str {
    match state {
        "ESTABLISHED" => "ESTAB",
        "SYN_SENT" => "SYN",
        "SYN_RECEIVED" => "SYNRCV",
        "FIN_WAIT" | "CLOSING" => "FIN",
        "MIDSTREAM" => "MID",
        other => other,
    }
}

/// The flows table.
pub struct FlowsTable<'a> {
    pub app: &'a App,
}

impl Widget for &FlowsTable<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let app = self.app;
        let block = Block::new().borders(Borders::TOP).title(title_line(app, app.rows.len()));
        let inner = block.inner(area);
        block.render(area, buf);
        let wide = area.width >= 120;
        let height = inner.height.saturating_sub(1) as usize;
        let visible = app.rows.iter().skip(app.offset).take(height);
        let rows = visible.map(|&i| {
            let f = &app.snapshot.flows[i];
            let rate = app.flow_rate(f.id);
            let mut cells = vec![Cell::from(f.proto.clone())];
            if wide {
                cells.push(Cell::from(f.local.to_string()));
            }
            cells.extend([
                Cell::from(f.remote.to_string()),
                Cell::from(f.name.clone().unwrap_or_default()),
                Cell::from(f.process.as_ref().map_or(String::new(), |p| p.comm.clone())),
                Cell::from(if wide { f.state.as_str() } else { short_state(&f.state) }.to_string()),
                Cell::from(Line::from(format::bytes(f.bytes_out)).right_aligned()),
                Cell::from(Line::from(format::bytes(f.bytes_in)).right_aligned()),
                Cell::from(Line::from(format::rate(rate.total())).right_aligned()),
                Cell::from(
                    Line::from(format::duration(app.now.saturating_sub(f.first_seen)))
                        .right_aligned(),
                ),
            ]);
            let row = Row::new(cells);
            if f.is_live() { row } else { row.style(DIM) }
        });
        let mut header = vec!["PROTO"];
        let mut widths = vec![Constraint::Length(5)];
        if wide {
            header.push("LOCAL");
            widths.push(Constraint::Fill(2));
        }
        header.extend(["REMOTE", "NAME", "PROCESS", "STATE", "OUT", "IN", "RATE", "AGE"]);
        widths.extend([
            Constraint::Fill(2),
            Constraint::Fill(2),
            Constraint::Length(if wide { 12 } else { 7 }),
            Constraint::Length(if wide { 11 } else { 6 }),
            Constraint::Length(6),
            Constraint::Length(6),
            Constraint::Length(7),
            Constraint::Length(5),
        ]);
        let table = Table::new(rows, widths)
            .header(Row::new(header).style(TITLE.fg(Color::Cyan)))
            .row_highlight_style(SELECTED)
            .column_spacing(1);
        let selected = app.selected_index().and_then(|i| i.checked_sub(app.offset));
        let mut state = TableState::new().with_selected(selected);
        ratatui::widgets::StatefulWidget::render(table, inner, buf, &mut state);
        if app.rows.is_empty() && inner.height > 1 {
            let msg = if app.snapshot.flows.is_empty() {
                "no flows yet"
            } else {
                "no flow matches the filter (Esc clears it)"
            };
            Span::styled(msg, DIM).render(Rect { y: inner.y + 1, height: 1, ..inner }, buf);
        }
    }
}

/// The process or destination view.
pub struct GroupsTable<'a> {
    pub app: &'a App,
}

impl Widget for &GroupsTable<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let app = self.app;
        let block = Block::new().borders(Borders::TOP).title(title_line(app, app.groups.len()));
        let inner = block.inner(area);
        block.render(area, buf);
        let height = inner.height.saturating_sub(1) as usize;
        let rows = app.groups.iter().skip(app.offset).take(height).map(|g: &Group| {
            Row::new([
                Cell::from(g.key.clone()),
                Cell::from(Line::from(format!("{}/{}", g.live, g.flows)).right_aligned()),
                Cell::from(Line::from(format::bytes(g.bytes_out)).right_aligned()),
                Cell::from(Line::from(format::bytes(g.bytes_in)).right_aligned()),
                Cell::from(Line::from(format::rate(g.rate.total())).right_aligned()),
                Cell::from(
                    Line::from(format::duration(app.now.saturating_sub(g.last_seen)))
                        .right_aligned(),
                ),
            ])
        });
        let first = if app.view == View::Processes { "PROCESS (PID)" } else { "DESTINATION" };
        let table = Table::new(
            rows,
            [
                Constraint::Fill(1),
                Constraint::Length(9),
                Constraint::Length(6),
                Constraint::Length(6),
                Constraint::Length(8),
                Constraint::Length(9),
            ],
        )
        .header(
            Row::new([first, "LIVE/ALL", "OUT", "IN", "RATE", "IDLE"]).style(TITLE.fg(Color::Cyan)),
        )
        .row_highlight_style(SELECTED)
        .column_spacing(1);
        let selected = app.selected_index().and_then(|i| i.checked_sub(app.offset));
        let mut state = TableState::new().with_selected(selected);
        ratatui::widgets::StatefulWidget::render(table, inner, buf, &mut state);
    }
}

/// Every field of one flow, and the timeline of its throughput.
pub struct Detail<'a> {
    pub app: &'a App,
    pub flow: &'a FlowRow,
}

impl Widget for &Detail<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let (app, f) = (self.app, self.flow);
        let title = Line::from(vec![
            Span::styled(format!(" flow #{} ", f.id), TITLE),
            Span::raw(format!("{} {} → {} ", f.proto, f.local, f.remote)),
            Span::styled("· Esc back ", DIM),
        ]);
        let block = Block::new().borders(Borders::TOP).title(title);
        let inner = block.inner(area);
        block.render(area, buf);
        let rate = app.flow_rate(f.id);
        let field = |k: &str, v: String| {
            Line::from(vec![Span::styled(format!("{k:<10}"), DIM), Span::raw(v)])
        };
        let dash = || "-".to_string();
        let left = vec![
            field("name", f.name.clone().unwrap_or_else(dash)),
            field(
                "process",
                f.process.as_ref().map_or_else(dash, |p| format!("{} (pid {})", p.comm, p.pid)),
            ),
            field("state", f.state.clone()),
            field("conn", f.conn_state.clone().unwrap_or_else(dash)),
            field("history", if f.history.is_empty() { dash() } else { f.history.clone() }),
            field("closed", f.close_reason.map_or_else(|| "no (live)".into(), close_reason_name)),
            field(
                "community",
                if f.community_id.is_empty() { dash() } else { f.community_id.clone() },
            ),
        ];
        let seen = |ns: u64| {
            format::duration(ns.saturating_sub(f.first_seen.min(app.snapshot.run.started)))
        };
        let right = vec![
            field(
                "bytes out",
                format!(
                    "{} ({} payload)",
                    format::count(f.bytes_out),
                    format::count(f.payload_out)
                ),
            ),
            field(
                "bytes in",
                format!("{} ({} payload)", format::count(f.bytes_in), format::count(f.payload_in)),
            ),
            field(
                "packets",
                format!("{} out, {} in", format::count(f.pkts_out), format::count(f.pkts_in)),
            ),
            field("rate", format!("↑ {}  ↓ {}", format::rate(rate.out), format::rate(rate.r#in))),
            field("first", format!("+{} into the run", seen(f.first_seen))),
            field(
                "last",
                format!(
                    "+{} ({} ago)",
                    seen(f.last_seen),
                    format::duration(app.now.saturating_sub(f.last_seen))
                ),
            ),
            field("duration", format::duration(f.last_seen.saturating_sub(f.first_seen))),
        ];
        let chart_h = if inner.height >= 10 { 3 } else { 0 };
        let fields = Rect { height: inner.height - chart_h, ..inner };
        if inner.width >= 80 {
            let half = fields.width / 2;
            Paragraph::new(left).render(Rect { width: half, ..fields }, buf);
            let right_area =
                Rect { x: fields.x + half + 1, width: fields.width - half - 1, ..fields };
            Paragraph::new(right).render(right_area, buf);
        } else {
            let mut all = left;
            all.extend(right);
            Paragraph::new(all).wrap(Wrap { trim: false }).render(fields, buf);
        }
        if chart_h > 0 {
            let timeline = app.history.flow(f.id).map(|s| s.timeline()).unwrap_or_default();
            let chart = Rect { y: inner.y + inner.height - chart_h, height: chart_h, ..inner };
            Line::styled(" timeline (per snapshot)", DIM).render(Rect { height: 1, ..chart }, buf);
            chart_row(
                " ↑ out ",
                &timeline_out(&timeline),
                Rect { y: chart.y + 1, height: 1, ..chart },
                buf,
            );
            chart_row(
                " ↓ in  ",
                &timeline_in(&timeline),
                Rect { y: chart.y + 2, height: 1, ..chart },
                buf,
            );
        }
    }
}

/// A close reason as the flow log spells it (`command_exit`, `idle_timeout`).
fn close_reason_name(r: crate::event::CloseReason) -> String {
    serde_json::to_value(r).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn timeline_out(t: &[Rate]) -> Vec<Rate> {
    t.iter().map(|r| Rate { out: r.out, r#in: 0.0 }).collect()
}

fn timeline_in(t: &[Rate]) -> Vec<Rate> {
    t.iter().map(|r| Rate { out: 0.0, r#in: r.r#in }).collect()
}

/// The command's terminal, through the emulator.
pub struct CommandPane<'a> {
    pub app: &'a App,
    pub screen: Option<&'a vt100::Screen>,
}

impl Widget for &CommandPane<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let app = self.app;
        let focused = app.focus == Focus::Command;
        let mut title = vec![Span::styled(" command ", TITLE)];
        title.push(match app.command_ended() {
            Some(end) => Span::raw(format!("· {} ", end.status)),
            None => Span::raw("· running "),
        });
        if app.command_scroll > 0 {
            title.push(Span::styled(
                format!("· scrolled back {} ", app.command_scroll),
                KEY.fg(Color::Yellow),
            ));
        }
        title.push(Span::styled(
            if focused {
                "· keys go to the command, Ctrl-] leaves "
            } else {
                "· Tab to type into it "
            },
            DIM,
        ));
        let border = if focused { Style::new().fg(Color::Yellow) } else { DIM };
        let block = Block::bordered().border_style(border).title(Line::from(title));
        match self.screen {
            Some(screen) => {
                let mut term = tui_term::widget::PseudoTerminal::new(screen).block(block);
                if !focused || app.command_scroll > 0 {
                    let mut cursor = tui_term::widget::Cursor::default();
                    cursor.hide();
                    term = term.cursor(cursor);
                }
                term.render(area, buf);
            }
            None => block.render(area, buf),
        }
    }
}

/// Key hints, the filter being typed, or a notice.
pub struct Footer<'a> {
    pub app: &'a App,
}

impl Widget for &Footer<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let app = self.app;
        let line = if app.filter_editing {
            Line::from(vec![
                Span::styled(" filter: /", KEY),
                Span::raw(app.filter.clone()),
                Span::styled("█", Style::new().add_modifier(Modifier::SLOW_BLINK)),
                Span::styled("  Enter keep · Esc clear", DIM),
            ])
        } else if let Some(notice) = &app.notice {
            Line::styled(format!(" {notice}"), KEY.fg(Color::Yellow))
        } else if app.focus == Focus::Command {
            Line::from(vec![
                Span::styled(" Ctrl-]", KEY),
                Span::raw(" dashboard  "),
                Span::styled("Shift-PgUp/PgDn", KEY),
                Span::raw(" scroll"),
            ])
        } else {
            let mut spans = vec![Span::styled("sort", DIM)];
            for key in SortKey::ALL {
                let (k, label) = key.key_and_label();
                let style = if key == app.sort { SELECTED } else { Style::new() };
                spans.push(Span::raw(" "));
                spans.push(Span::styled(
                    k.to_string(),
                    KEY.add_modifier(Modifier::UNDERLINED).patch(style),
                ));
                spans.push(Span::styled(label[1..].to_string(), style));
            }
            spans.push(Span::styled("  view", DIM));
            for (i, view) in View::ALL.iter().enumerate() {
                let style = if *view == app.view { SELECTED } else { Style::new() };
                spans.push(Span::raw(" "));
                spans.push(Span::styled(format!("{}", i + 1), KEY.patch(style)));
                spans.push(Span::styled(short_view(*view), style));
            }
            let hints: &[_] = if area.width > 90 {
                &[("/", "filter"), ("⏎", "detail"), ("?", "help"), ("q", "quit")]
            } else {
                &[("/", "filter"), ("⏎", "detail"), ("?", "help")]
            };
            for &(k, what) in hints {
                spans.push(Span::raw("  "));
                spans.push(Span::styled(k, KEY));
                spans.push(Span::raw(format!(" {what}")));
            }
            Line::from(spans)
        };
        line.render(area, buf);
    }
}

fn short_view(view: View) -> &'static str {
    match view {
        View::Flows => "flows",
        View::Processes => "procs",
        View::Destinations => "dests",
    }
}

/// The help overlay.
pub struct Help;

pub const HELP: &[(&str, &str)] = &[
    ("↑ ↓ j k", "select a row (PgUp PgDn Home End)"),
    ("Enter", "flow detail / flows of a group"),
    ("Esc", "back: detail, group, filter"),
    ("/", "filter by name, address, port, process"),
    ("b r t n", "sort by bytes, rate, time, name"),
    ("1 2 3  v", "flows, processes, destinations"),
    ("Space", "pause the display (data still collected)"),
    ("Tab", "type into the command's pane"),
    ("Ctrl-]", "back from the command's pane"),
    ("Shift-PgUp", "scroll the command's output"),
    ("?", "this help"),
    ("q", "quit (twice while the command runs)"),
];

impl Widget for &Help {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let w = 56.min(area.width);
        let h = (HELP.len() as u16 + 2).min(area.height);
        let popup = Rect {
            x: area.x + (area.width - w) / 2,
            y: area.y + (area.height - h) / 2,
            width: w,
            height: h,
        };
        Clear.render(popup, buf);
        let lines: Vec<Line> = HELP
            .iter()
            .map(|(k, v)| Line::from(vec![Span::styled(format!(" {k:<11}"), KEY), Span::raw(*v)]))
            .collect();
        Paragraph::new(lines)
            .block(Block::bordered().title(Line::styled(" keys · any key closes ", TITLE)))
            .render(popup, buf);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ratatui::{Terminal, backend::TestBackend};

    use super::*;
    use crate::tui::{
        app::{
            Action,
            tests::{app_with, three_flows},
        },
        model::{DropCount, fixtures::*},
    };

    /// `buf` with every style removed, to compare its text with `Buffer::with_lines`.
    fn unstyled(buf: &Buffer) -> Buffer {
        let mut plain = Buffer::empty(buf.area);
        for (to, from) in plain.content.iter_mut().zip(&buf.content) {
            to.set_symbol(from.symbol());
        }
        plain
    }

    /// The app after a second snapshot in which the big download grew, so rates are set.
    fn running_app() -> App {
        let mut app = app_with(three_flows());
        let mut flows = three_flows();
        flows[2] = grown(flows[2].clone(), 2);
        app.update(Action::Snapshot(Arc::new(snapshot(11, flows))));
        app.update(Action::Tick(T0 + 12 * SEC));
        app
    }

    fn screen(app: &App, command: Option<&vt100::Screen>, w: u16, h: u16) -> TestBackend {
        let mut app_sized = TestBackend::new(w, h);
        let mut terminal = Terminal::new(app_sized.clone()).unwrap();
        terminal.draw(|f| app.render(f, command)).unwrap();
        app_sized = terminal.backend().clone();
        app_sized
    }

    fn command_output() -> vt100::Parser {
        let mut parser = vt100::Parser::new(4, 78, 100);
        parser.process(b"$ curl -s https://example.test/\r\n\x1b[32m<html>hello</html>\x1b[0m\r\n");
        parser.process(b"downloading  50%\rdownloading 100%");
        parser
    }

    #[test]
    fn footer_shows_sort_and_view_keys() {
        let app = running_app();
        let mut buf = Buffer::empty(Rect::new(0, 0, 80, 1));
        (&Footer { app: &app }).render(buf.area, &mut buf);
        assert_eq!(
            unstyled(&buf),
            Buffer::with_lines([
                "sort bytes rate time name  view 1flows 2procs 3dests  / filter  ⏎ detail  ? help"
            ])
        );
        let b = buf.cell((5, 0)).unwrap();
        assert!(b.modifier.contains(Modifier::REVERSED), "the active sort key is highlighted");
    }

    #[test]
    fn header_highlights_drops_and_evictions_only_when_non_zero() {
        let mut app = running_app();
        let mut buf = Buffer::empty(Rect::new(0, 0, 80, 2));
        (&Header { app: &app }).render(buf.area, &mut buf);
        assert_eq!(
            unstyled(&buf),
            Buffer::with_lines([
                format!(
                    "{:<80}",
                    " childflow 00:12 │ running │ rootless │ curl -s https://example.test/"
                ),
                format!(
                    "{:<80}",
                    " ↑ 20K 9.8K/s  ↓ 391K 195K/s │ flows 2/3 │ names 1 │ drops 0 evicted 0"
                ),
            ])
        );
        let mut snap = (*app.snapshot).clone();
        snap.ts += SEC;
        snap.drops = vec![DropCount { source: "event queue".into(), count: 1234 }];
        snap.evictions = 7;
        app.update(Action::Snapshot(Arc::new(snap)));
        let mut buf = Buffer::empty(Rect::new(0, 0, 80, 2));
        (&Header { app: &app }).render(buf.area, &mut buf);
        let line: String = (0..80).map(|x| buf.cell((x, 1)).unwrap().symbol()).collect();
        assert!(line.contains(" drops 1,234   evicted 7 "), "{line}");
        let x = line.split(" drops 1,234").next().unwrap().chars().count() as u16 + 1;
        assert_eq!(buf.cell((x, 1)).unwrap().bg, Color::Red);
    }

    #[test]
    fn help_overlay_lists_the_keys() {
        let mut buf = Buffer::empty(Rect::new(0, 0, 60, 16));
        (&Help).render(buf.area, &mut buf);
        let text: Vec<String> = (0..16)
            .map(|y| (0..60).map(|x| buf.cell((x, y)).unwrap().symbol()).collect())
            .collect();
        assert!(text.iter().any(|l| l.contains("┌ keys · any key closes")), "{text:#?}");
        assert!(text.iter().any(|l| l.contains("Space      pause the display")), "{text:#?}");
    }

    #[test]
    fn screen_flows() {
        let app = running_app();
        let parser = command_output();
        insta::assert_snapshot!(screen(&app, Some(parser.screen()), 80, 24));
    }

    #[test]
    fn screen_flows_wide() {
        let app = running_app();
        insta::assert_snapshot!(screen(&app, Some(command_output().screen()), 140, 30));
    }

    #[test]
    fn screen_detail() {
        let mut app = running_app();
        app.update(Action::Open);
        insta::assert_snapshot!(screen(&app, Some(command_output().screen()), 80, 24));
    }

    #[test]
    fn screen_by_process() {
        let mut app = running_app();
        app.update(Action::SetView(View::Processes));
        insta::assert_snapshot!(screen(&app, Some(command_output().screen()), 80, 24));
    }

    #[test]
    fn screen_by_destination() {
        let mut app = running_app();
        app.update(Action::SetView(View::Destinations));
        insta::assert_snapshot!(screen(&app, None, 80, 24));
    }

    #[test]
    fn screen_help() {
        let mut app = running_app();
        app.update(Action::ToggleHelp);
        insta::assert_snapshot!(screen(&app, Some(command_output().screen()), 80, 24));
    }

    #[test]
    fn screen_filter_and_command_focus() {
        let mut app = running_app();
        app.update(Action::StartFilter);
        for c in "curl".chars() {
            app.update(Action::FilterChar(c));
        }
        app.update(Action::FilterAccept);
        app.update(Action::FocusCommand);
        insta::assert_snapshot!(screen(&app, Some(command_output().screen()), 80, 24));
    }

    #[test]
    fn screen_attached_without_command_pane() {
        let mut app = App::new(Arc::new(snapshot(10, three_flows())), false);
        app.update(Action::Resize(80, 24));
        app.update(Action::TogglePause);
        insta::assert_snapshot!(screen(&app, None, 80, 24));
    }
}
