//! The dashboard's state and its transitions (the "model" and "update" of the Elm shape).
//!
//! [`App`] holds everything the screen shows; [`App::update`] is the only way it changes,
//! one [`Action`] at a time, and answers with an [`Effect`] for the runtime to carry out
//! (write to the command, resize its pty, quit). Rendering ([`super::ui`]) reads the `App`
//! and never changes it, so every screen is a function of the actions applied so far; tests
//! drive `update` with fixture snapshots and keys, no terminal, thread or clock involved.
//!
//! Invariants:
//! - The selection is a flow id (or a group key in the aggregated views), never a row index,
//!   so it stays on its flow while rows are re-sorted; it falls back to the nearest row only
//!   when its flow leaves the view.
//! - The rows on screen are recomputed only when the snapshot, the sort, the filter or the
//!   view changes, never while rendering.
//! - While paused the displayed snapshot is frozen, but the rate history keeps taking in
//!   every new snapshot, so nothing is lost when resuming.

use std::{collections::HashMap, sync::Arc};

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use super::{
    history::{History, Rate},
    model::{FlowRow, RunEnd, Snapshot},
};
use crate::event::UnixNanos;

/// The main views, switched with `1`/`2`/`3` or `v`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum View {
    /// One row per flow.
    #[default]
    Flows,
    /// One row per process, flows aggregated.
    Processes,
    /// One row per destination (DNS name, else address), flows aggregated.
    Destinations,
}

impl View {
    pub const ALL: [View; 3] = [View::Flows, View::Processes, View::Destinations];

    pub fn title(self) -> &'static str {
        match self {
            View::Flows => "flows",
            View::Processes => "processes",
            View::Destinations => "destinations",
        }
    }
}

/// Row orders, each with its natural direction (biggest, fastest, newest first; names A–Z).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SortKey {
    #[default]
    Bytes,
    Rate,
    Recent,
    Name,
}

impl SortKey {
    pub const ALL: [SortKey; 4] = [SortKey::Bytes, SortKey::Rate, SortKey::Recent, SortKey::Name];

    /// The key that selects it and the word shown in the footer.
    pub fn key_and_label(self) -> (char, &'static str) {
        match self {
            SortKey::Bytes => ('b', "bytes"),
            SortKey::Rate => ('r', "rate"),
            SortKey::Recent => ('t', "time"),
            SortKey::Name => ('n', "name"),
        }
    }
}

/// Where keystrokes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Focus {
    #[default]
    Dashboard,
    /// The command's pane: keys are written to its pty.
    Command,
}

/// Restricts the flows view to one group of an aggregated view (Enter on a group row).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub view: View,
    pub key: String,
}

/// Everything that can happen to the dashboard.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A newer snapshot from the collector.
    Snapshot(Arc<Snapshot>),
    /// The wall clock moved (drives elapsed time and ages).
    Tick(UnixNanos),
    /// The terminal is now this many columns and rows.
    Resize(u16, u16),
    /// Move the selection by this many rows (negative: up).
    Move(isize),
    /// Select the first or the last row.
    Home,
    End,
    PageUp,
    PageDown,
    Sort(SortKey),
    SetView(View),
    NextView,
    /// Enter: a flow's detail, or the flows of a group.
    Open,
    /// Esc: close the detail, the scope, or the filter, innermost first.
    Back,
    StartFilter,
    FilterChar(char),
    FilterBackspace,
    FilterAccept,
    FilterCancel,
    ToggleHelp,
    TogglePause,
    FocusCommand,
    FocusDashboard,
    /// Scroll the command pane's scrollback by this many lines (positive: back in time).
    ScrollCommand(isize),
    /// A key for the command (the command pane has focus).
    CommandKey(KeyEvent),
    /// The command ended.
    CommandEnded(RunEnd),
    Quit,
}

/// What the runtime must do after an update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Encode this key for the command's terminal and write it to the pty.
    WriteKey(KeyEvent),
    /// The command pane changed size: resize the pty and the emulator (rows, cols).
    ResizeCommand(u16, u16),
    /// Leave the dashboard.
    Quit,
}

/// One row of an aggregated view.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// What the rows are grouped by: `curl (42)`, `example.test`, `198.18.1.2`.
    pub key: String,
    pub flows: usize,
    pub live: usize,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub rate: Rate,
    pub last_seen: UnixNanos,
}

impl Group {
    fn bytes(&self) -> u64 {
        self.bytes_out + self.bytes_in
    }
}

/// Rows reserved above and below the flows table (header and footer), see [`Layout`].
pub const HEADER_ROWS: u16 = 3;
pub const FOOTER_ROWS: u16 = 1;

/// The screen's regions for a terminal size, shared by `update` (page size, pty size) and
/// rendering so they always agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub header: ratatui::layout::Rect,
    /// The table, detail, or aggregated view (with its one-line title).
    pub body: ratatui::layout::Rect,
    /// The command pane including its border, when there is a command pane.
    pub command: Option<ratatui::layout::Rect>,
    pub footer: ratatui::layout::Rect,
}

impl Layout {
    pub fn new(area: ratatui::layout::Rect, command_pane: bool, command_focused: bool) -> Self {
        use ratatui::layout::Rect;
        let header_h = HEADER_ROWS.min(area.height);
        let footer_h = FOOTER_ROWS.min(area.height - header_h);
        let middle_h = area.height - header_h - footer_h;
        let header = Rect { height: header_h, ..area };
        let footer = Rect { y: area.y + area.height - footer_h, height: footer_h, ..area };
        let (body_h, cmd_h) = if command_pane {
            let cmd = if command_focused { middle_h * 2 / 3 } else { (middle_h / 3).max(5) };
            let cmd = cmd.min(middle_h);
            (middle_h - cmd, cmd)
        } else {
            (middle_h, 0)
        };
        let body = Rect { y: area.y + header_h, height: body_h, ..area };
        let command =
            command_pane.then_some(Rect { y: area.y + header_h + body_h, height: cmd_h, ..area });
        Self { header, body, command, footer }
    }

    /// Rows of the body available to table rows (title and column header take two).
    pub fn table_rows(&self) -> usize {
        self.body.height.saturating_sub(2) as usize
    }

    /// The terminal size inside the command pane's border (rows, cols).
    pub fn command_inner(&self) -> Option<(u16, u16)> {
        self.command.map(|r| (r.height.saturating_sub(2).max(1), r.width.saturating_sub(2).max(1)))
    }
}

/// See the module documentation.
#[derive(Debug)]
pub struct App {
    /// The snapshot on screen (frozen while paused).
    pub snapshot: Arc<Snapshot>,
    /// The newest snapshot received, on screen or not.
    latest: Arc<Snapshot>,
    pub history: History,
    pub now: UnixNanos,
    pub size: (u16, u16),
    pub view: View,
    pub sort: SortKey,
    pub filter: String,
    pub filter_editing: bool,
    pub scope: Option<Scope>,
    /// Indices into `snapshot.flows`, filtered and sorted (flows view).
    pub rows: Vec<usize>,
    /// Aggregated rows (process and destination views).
    pub groups: Vec<Group>,
    pub selected_flow: Option<u64>,
    pub selected_group: Option<String>,
    /// The first visible row of the table.
    pub offset: usize,
    /// The flow whose detail is open.
    pub detail: Option<u64>,
    pub help: bool,
    pub paused: bool,
    pub focus: Focus,
    /// Whether there is a command pane (there is none when attached to another run).
    pub has_command: bool,
    /// How far the command pane is scrolled back, in lines.
    pub command_scroll: usize,
    /// Set when the command ended (also learned from the snapshot's run info).
    pub command_end: Option<RunEnd>,
    /// A one-line notice in the footer (e.g. "press q again").
    pub notice: Option<String>,
    confirm_quit: bool,
    last_command_size: Option<(u16, u16)>,
}

impl App {
    /// A dashboard showing `snapshot`, with a command pane if `has_command`.
    pub fn new(snapshot: Arc<Snapshot>, has_command: bool) -> Self {
        let mut app = Self {
            now: snapshot.ts,
            latest: snapshot.clone(),
            snapshot,
            history: History::default(),
            size: (80, 24),
            view: View::Flows,
            sort: SortKey::Bytes,
            filter: String::new(),
            filter_editing: false,
            scope: None,
            rows: Vec::new(),
            groups: Vec::new(),
            selected_flow: None,
            selected_group: None,
            offset: 0,
            detail: None,
            help: false,
            paused: false,
            focus: Focus::Dashboard,
            has_command,
            command_scroll: 0,
            command_end: None,
            notice: None,
            confirm_quit: false,
            last_command_size: None,
        };
        app.history.observe(&app.snapshot.clone());
        app.refresh();
        app
    }

    /// The screen layout for the current terminal size.
    pub fn layout(&self) -> Layout {
        let area = ratatui::layout::Rect::new(0, 0, self.size.0, self.size.1);
        Layout::new(area, self.has_command, self.focus == Focus::Command)
    }

    /// Whether the command has ended, by what the runtime or the snapshot said.
    pub fn command_ended(&self) -> Option<&RunEnd> {
        self.command_end.as_ref().or(self.snapshot.run.ended.as_ref())
    }

    /// A flow's current rate; zero once the command ended (nothing moves any more, though
    /// the last snapshots still show growth within the rate window).
    pub fn flow_rate(&self, id: u64) -> Rate {
        if self.command_ended().is_some() { Rate::default() } else { self.history.rate(id) }
    }

    /// The run's current rate; zero once the command ended.
    pub fn run_rate(&self) -> Rate {
        if self.command_ended().is_some() { Rate::default() } else { self.history.run_rate() }
    }

    /// The flow shown in the detail view.
    pub fn detail_flow(&self) -> Option<&FlowRow> {
        let id = self.detail?;
        self.snapshot.flows.iter().find(|f| f.id == id).map(|f| &**f)
    }

    /// The selected flow, if the flows view has one.
    pub fn selected(&self) -> Option<&FlowRow> {
        let id = self.selected_flow?;
        self.snapshot.flows.iter().find(|f| f.id == id).map(|f| &**f)
    }

    /// The index of the selected row among the visible rows.
    pub fn selected_index(&self) -> Option<usize> {
        match self.view {
            View::Flows => {
                let id = self.selected_flow?;
                self.rows.iter().position(|&i| self.snapshot.flows[i].id == id)
            }
            _ => {
                let key = self.selected_group.as_ref()?;
                self.groups.iter().position(|g| &g.key == key)
            }
        }
    }

    fn row_count(&self) -> usize {
        match self.view {
            View::Flows => self.rows.len(),
            _ => self.groups.len(),
        }
    }

    /// Maps a key press to an action, given where the focus is and what is open.
    pub fn key_action(&self, key: KeyEvent) -> Option<Action> {
        if key.kind == KeyEventKind::Release {
            return None;
        }
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let shift = key.modifiers.contains(KeyModifiers::SHIFT);
        let half = (self.layout().command_inner().map_or(10, |(r, _)| r as isize) / 2).max(1);
        if self.focus == Focus::Command {
            // Ctrl-] leaves the pane (telnet's escape): Tab must reach the command, shells
            // complete with it.
            return Some(match key.code {
                KeyCode::Char(']') if ctrl => Action::FocusDashboard,
                KeyCode::Char('5') if ctrl => Action::FocusDashboard,
                KeyCode::PageUp if shift => Action::ScrollCommand(half),
                KeyCode::PageDown if shift => Action::ScrollCommand(-half),
                _ => Action::CommandKey(key),
            });
        }
        if self.help {
            return Some(match key.code {
                KeyCode::Char('q') => Action::Quit,
                _ => Action::ToggleHelp,
            });
        }
        if self.filter_editing {
            return match key.code {
                KeyCode::Enter => Some(Action::FilterAccept),
                KeyCode::Esc => Some(Action::FilterCancel),
                KeyCode::Backspace => Some(Action::FilterBackspace),
                KeyCode::Char('c') if ctrl => Some(Action::FilterCancel),
                KeyCode::Char(c) if !ctrl => Some(Action::FilterChar(c)),
                _ => None,
            };
        }
        Some(match key.code {
            KeyCode::Char('c') if ctrl => Action::Quit,
            KeyCode::Char('q') => Action::Quit,
            KeyCode::Up | KeyCode::Char('k') => Action::Move(-1),
            KeyCode::Down | KeyCode::Char('j') => Action::Move(1),
            KeyCode::PageUp if shift => Action::ScrollCommand(half),
            KeyCode::PageDown if shift => Action::ScrollCommand(-half),
            KeyCode::PageUp => Action::PageUp,
            KeyCode::PageDown => Action::PageDown,
            KeyCode::Home | KeyCode::Char('g') => Action::Home,
            KeyCode::End | KeyCode::Char('G') => Action::End,
            KeyCode::Char('b') => Action::Sort(SortKey::Bytes),
            KeyCode::Char('r') => Action::Sort(SortKey::Rate),
            KeyCode::Char('t') => Action::Sort(SortKey::Recent),
            KeyCode::Char('n') => Action::Sort(SortKey::Name),
            KeyCode::Char('1') => Action::SetView(View::Flows),
            KeyCode::Char('2') => Action::SetView(View::Processes),
            KeyCode::Char('3') => Action::SetView(View::Destinations),
            KeyCode::Char('v') => Action::NextView,
            KeyCode::Char('/') => Action::StartFilter,
            KeyCode::Enter => Action::Open,
            KeyCode::Esc | KeyCode::Backspace | KeyCode::Left => Action::Back,
            KeyCode::Char('?') | KeyCode::F(1) => Action::ToggleHelp,
            KeyCode::Char(' ') => Action::TogglePause,
            KeyCode::Tab if self.has_command => Action::FocusCommand,
            _ => return None,
        })
    }

    /// Applies `action`; see the module documentation.
    pub fn update(&mut self, action: Action) -> Effect {
        if !matches!(action, Action::Quit | Action::Snapshot(_) | Action::Tick(_)) {
            self.confirm_quit = false;
            self.notice = None;
        }
        match action {
            Action::Snapshot(snap) => {
                self.history.observe(&snap);
                self.now = self.now.max(snap.ts);
                self.latest = snap;
                if !self.paused {
                    self.show_latest();
                }
            }
            Action::Tick(now) => self.now = now,
            Action::Resize(w, h) => {
                self.size = (w, h);
                self.clamp_offset();
                return self.command_size_effect();
            }
            Action::Move(n) => self.move_by(n),
            Action::Home => self.select_index(0),
            Action::End => self.select_index(self.row_count().saturating_sub(1)),
            Action::PageUp => self.move_by(-(self.layout().table_rows().max(1) as isize)),
            Action::PageDown => self.move_by(self.layout().table_rows().max(1) as isize),
            Action::Sort(key) => {
                self.sort = key;
                self.refresh();
            }
            Action::SetView(view) => {
                self.view = view;
                self.detail = None;
                self.refresh();
            }
            Action::NextView => {
                let i = View::ALL.iter().position(|v| *v == self.view).unwrap_or(0);
                return self.update(Action::SetView(View::ALL[(i + 1) % View::ALL.len()]));
            }
            Action::Open => match self.view {
                View::Flows => {
                    if self.detail.is_some() {
                        self.detail = None;
                    } else {
                        self.detail = self.selected_flow;
                    }
                }
                view => {
                    if let Some(key) = self.selected_group.clone() {
                        self.scope = Some(Scope { view, key });
                        self.view = View::Flows;
                        self.refresh();
                    }
                }
            },
            Action::Back => {
                if self.detail.is_some() {
                    self.detail = None;
                } else if let Some(scope) = self.scope.take() {
                    self.view = scope.view;
                    self.selected_group = Some(scope.key);
                    self.refresh();
                } else if !self.filter.is_empty() {
                    self.filter.clear();
                    self.refresh();
                }
            }
            Action::StartFilter => self.filter_editing = true,
            Action::FilterChar(c) => {
                self.filter.push(c);
                self.refresh();
            }
            Action::FilterBackspace => {
                self.filter.pop();
                self.refresh();
            }
            Action::FilterAccept => self.filter_editing = false,
            Action::FilterCancel => {
                self.filter_editing = false;
                self.filter.clear();
                self.refresh();
            }
            Action::ToggleHelp => self.help = !self.help,
            Action::TogglePause => {
                self.paused = !self.paused;
                if !self.paused {
                    self.show_latest();
                }
            }
            Action::FocusCommand if self.has_command => {
                self.focus = Focus::Command;
                self.clamp_offset();
                return self.command_size_effect();
            }
            Action::FocusCommand => {}
            Action::FocusDashboard => {
                self.focus = Focus::Dashboard;
                self.clamp_offset();
                return self.command_size_effect();
            }
            Action::ScrollCommand(n) => {
                self.command_scroll = self.command_scroll.saturating_add_signed(n);
            }
            Action::CommandKey(key) => {
                // Typing brings the pane back to the live screen, as terminals do.
                self.command_scroll = 0;
                return Effect::WriteKey(key);
            }
            Action::CommandEnded(end) => self.command_end = Some(end),
            Action::Quit => {
                if self.has_command && self.command_ended().is_none() && !self.confirm_quit {
                    self.confirm_quit = true;
                    self.notice =
                        Some("the command is still running: q again ends it (SIGHUP)".into());
                    return Effect::None;
                }
                return Effect::Quit;
            }
        }
        Effect::None
    }

    fn command_size_effect(&mut self) -> Effect {
        match self.layout().command_inner() {
            Some(size) if self.last_command_size != Some(size) => {
                self.last_command_size = Some(size);
                Effect::ResizeCommand(size.0, size.1)
            }
            _ => Effect::None,
        }
    }

    fn move_by(&mut self, n: isize) {
        let current = self.selected_index().unwrap_or(0);
        let target = current.saturating_add_signed(n);
        self.select_index(target.min(self.row_count().saturating_sub(1)));
        if self.detail.is_some() {
            self.detail = self.selected_flow;
        }
    }

    fn select_index(&mut self, i: usize) {
        match self.view {
            View::Flows => {
                self.selected_flow = self.rows.get(i).map(|&r| self.snapshot.flows[r].id);
            }
            _ => self.selected_group = self.groups.get(i).map(|g| g.key.clone()),
        }
        self.clamp_offset();
    }

    /// Keeps the selected row inside the visible window.
    fn clamp_offset(&mut self) {
        let height = self.layout().table_rows().max(1);
        let count = self.row_count();
        let sel = self.selected_index().unwrap_or(0);
        if sel < self.offset {
            self.offset = sel;
        } else if sel >= self.offset + height {
            self.offset = sel + 1 - height;
        }
        self.offset = self.offset.min(count.saturating_sub(height));
    }

    /// Puts the newest snapshot on screen.
    fn show_latest(&mut self) {
        let previous = self.selected_index();
        self.snapshot = self.latest.clone();
        self.refresh_from(previous);
    }

    fn refresh(&mut self) {
        self.refresh_from(self.selected_index());
    }

    /// Recomputes the visible rows and keeps the selection on its flow (or group); if it is
    /// gone, selects the row now at `previous`, the index it had.
    fn refresh_from(&mut self, previous: Option<usize>) {
        let snap = self.snapshot.clone();
        let matching: Vec<usize> = (0..snap.flows.len())
            .filter(|&i| matches_filter(&snap.flows[i], &self.filter))
            .filter(|&i| {
                self.scope.as_ref().is_none_or(|s| group_key(s.view, &snap.flows[i]) == s.key)
            })
            .collect();
        match self.view {
            View::Flows => {
                let mut rows = matching;
                sort_flows(&mut rows, &snap.flows, self.sort, &self.history);
                self.rows = rows;
                self.groups.clear();
                let still_there = self
                    .selected_flow
                    .is_some_and(|id| self.rows.iter().any(|&i| snap.flows[i].id == id));
                if !still_there {
                    let i = previous.unwrap_or(0).min(self.rows.len().saturating_sub(1));
                    self.selected_flow = self.rows.get(i).map(|&r| snap.flows[r].id);
                }
            }
            view => {
                let flows = matching.iter().map(|&i| &*snap.flows[i]);
                self.groups = aggregate(view, flows, |id| self.flow_rate(id));
                sort_groups(&mut self.groups, self.sort);
                self.rows.clear();
                let still_there = self
                    .selected_group
                    .as_ref()
                    .is_some_and(|k| self.groups.iter().any(|g| &g.key == k));
                if !still_there {
                    let i = previous.unwrap_or(0).min(self.groups.len().saturating_sub(1));
                    self.selected_group = self.groups.get(i).map(|g| g.key.clone());
                }
            }
        }
        self.clamp_offset();
    }
}

/// Whether `flow` matches the `/` filter: a case-insensitive substring of its protocol,
/// addresses and ports, DNS name, process name or pid, or state.
pub fn matches_filter(flow: &FlowRow, filter: &str) -> bool {
    if filter.is_empty() {
        return true;
    }
    let needle = filter.to_lowercase();
    let hay = |s: &str| s.to_lowercase().contains(&needle);
    hay(&flow.proto)
        || hay(&flow.local.to_string())
        || hay(&flow.remote.to_string())
        || flow.name.as_deref().is_some_and(hay)
        || flow.process.as_ref().is_some_and(|p| hay(&p.comm) || hay(&p.pid.to_string()))
        || hay(&flow.state)
}

/// The group a flow belongs to in an aggregated view.
pub fn group_key(view: View, flow: &FlowRow) -> String {
    match view {
        View::Processes => match &flow.process {
            Some(p) => format!("{} ({})", p.comm, p.pid),
            None => "(unknown)".into(),
        },
        View::Destinations | View::Flows => flow.destination(),
    }
}

/// Sorts flow indices by `key`; ties go to the older flow (lower id) so equal rows keep
/// their places from one snapshot to the next.
pub fn sort_flows(rows: &mut [usize], flows: &[Arc<FlowRow>], key: SortKey, history: &History) {
    match key {
        SortKey::Bytes => rows.sort_by_key(|&i| {
            let f = &flows[i];
            (std::cmp::Reverse(f.bytes_out + f.bytes_in), f.id)
        }),
        SortKey::Rate => {
            let rates: HashMap<u64, f64> =
                rows.iter().map(|&i| (flows[i].id, history.rate(flows[i].id).total())).collect();
            rows.sort_by(|&a, &b| {
                let (fa, fb) = (&flows[a], &flows[b]);
                rates[&fb.id].total_cmp(&rates[&fa.id]).then(fa.id.cmp(&fb.id))
            });
        }
        SortKey::Recent => {
            rows.sort_by_key(|&i| (std::cmp::Reverse(flows[i].last_seen), flows[i].id))
        }
        // The key allocates (the destination string): computed once per row, not per
        // comparison.
        SortKey::Name => rows.sort_by_cached_key(|&i| {
            let f = &flows[i];
            (f.name.is_none(), f.destination(), f.remote.port(), f.id)
        }),
    }
}

/// Sums flows into groups for an aggregated view.
pub fn aggregate<'a>(
    view: View,
    flows: impl Iterator<Item = &'a FlowRow>,
    rate: impl Fn(u64) -> Rate,
) -> Vec<Group> {
    let mut groups: HashMap<String, Group> = HashMap::new();
    for f in flows {
        let key = group_key(view, f);
        let g = groups.entry(key.clone()).or_insert_with(|| Group {
            key,
            flows: 0,
            live: 0,
            bytes_out: 0,
            bytes_in: 0,
            rate: Rate::default(),
            last_seen: 0,
        });
        let r = rate(f.id);
        g.flows += 1;
        g.live += usize::from(f.is_live());
        g.bytes_out += f.bytes_out;
        g.bytes_in += f.bytes_in;
        g.rate.out += r.out;
        g.rate.r#in += r.r#in;
        g.last_seen = g.last_seen.max(f.last_seen);
    }
    groups.into_values().collect()
}

/// Sorts groups by `key`, ties by name.
pub fn sort_groups(groups: &mut [Group], key: SortKey) {
    match key {
        SortKey::Bytes => groups.sort_by(|a, b| b.bytes().cmp(&a.bytes()).then(a.key.cmp(&b.key))),
        SortKey::Rate => {
            groups.sort_by(|a, b| b.rate.total().total_cmp(&a.rate.total()).then(a.key.cmp(&b.key)))
        }
        SortKey::Recent => {
            groups.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.key.cmp(&b.key)))
        }
        SortKey::Name => groups.sort_by(|a, b| a.key.cmp(&b.key)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tui::model::{ProcessRef, fixtures::*};

    /// Three flows: a big download from example.test, a small one to other.example.test by
    /// wget, and an unnamed DNS exchange.
    pub fn three_flows() -> Vec<FlowRow> {
        let big = grown(established_flow(1), 10);
        let mut other = established_flow(2);
        other.name = Some("other.example.test".into());
        other.remote = "198.18.1.3:80".parse().unwrap();
        other.process = Some(ProcessRef { pid: 43, comm: "wget".into() });
        other.last_seen = T0 + 5 * SEC;
        (other.bytes_out, other.bytes_in) = (100, 200);
        let dns = dns_flow(3);
        vec![dns, other, big]
    }

    pub fn app_with(flows: Vec<FlowRow>) -> App {
        let mut app = App::new(Arc::new(snapshot(10, flows)), true);
        app.update(Action::Resize(80, 24));
        app
    }

    fn ids(app: &App) -> Vec<u64> {
        app.rows.iter().map(|&i| app.snapshot.flows[i].id).collect()
    }

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn each_sort_key_orders_the_flows() {
        let mut app = app_with(three_flows());
        assert_eq!(ids(&app), [1, 2, 3], "bytes: biggest first");
        app.update(Action::Sort(SortKey::Recent));
        assert_eq!(ids(&app), [2, 1, 3], "time: last seen first, ties by id");
        app.update(Action::Sort(SortKey::Name));
        assert_eq!(ids(&app), [1, 2, 3], "name: named A-Z, unnamed last");
    }

    #[test]
    fn rate_sort_uses_the_growth_between_snapshots() {
        let mut app = app_with(three_flows());
        let mut flows = three_flows();
        flows[1] = grown(flows[1].clone(), 1000); // wget's flow suddenly moves a lot
        app.update(Action::Snapshot(Arc::new(snapshot(11, flows))));
        app.update(Action::Sort(SortKey::Rate));
        assert_eq!(ids(&app)[0], 2);
    }

    #[test]
    fn the_selection_follows_its_flow_when_rows_move() {
        let mut app = app_with(three_flows());
        app.update(Action::Move(1));
        assert_eq!(app.selected_flow, Some(2));
        let mut flows = three_flows();
        flows[1] = grown(flows[1].clone(), 10_000); // now the biggest: moves to the top
        app.update(Action::Snapshot(Arc::new(snapshot(11, flows))));
        assert_eq!(ids(&app), [2, 1, 3]);
        assert_eq!(app.selected_flow, Some(2), "still the same flow");
        assert_eq!(app.selected_index(), Some(0));
    }

    #[test]
    fn a_vanished_selection_falls_back_to_the_row_at_its_place() {
        let mut app = app_with(three_flows());
        app.update(Action::Move(1));
        let flows: Vec<FlowRow> = three_flows().into_iter().filter(|f| f.id != 2).collect();
        app.update(Action::Snapshot(Arc::new(snapshot(11, flows))));
        assert_eq!(app.selected_flow, Some(3));
    }

    #[test]
    fn the_filter_matches_name_address_port_and_process() {
        let mut app = app_with(three_flows());
        for (text, expect) in [
            ("other", vec![2]),
            ("198.18.1.3", vec![2]),
            (":53", vec![3]),
            ("WGET", vec![2]),
            ("curl", vec![1, 3]),
            ("nothing-matches", vec![]),
        ] {
            app.update(Action::FilterCancel);
            app.update(Action::StartFilter);
            for c in text.chars() {
                app.update(Action::FilterChar(c));
            }
            assert_eq!(ids(&app), expect, "filter {text:?}");
        }
        assert_eq!(app.selected_flow, None, "nothing to select");
        app.update(Action::FilterBackspace);
        app.update(Action::FilterCancel);
        assert_eq!(ids(&app), [1, 2, 3]);
    }

    #[test]
    fn keys_while_filtering_edit_the_filter() {
        let mut app = app_with(three_flows());
        let a = app.key_action(key(KeyCode::Char('/'))).unwrap();
        app.update(a);
        assert_eq!(app.key_action(key(KeyCode::Char('q'))), Some(Action::FilterChar('q')));
        assert_eq!(app.key_action(key(KeyCode::Enter)), Some(Action::FilterAccept));
    }

    #[test]
    fn process_and_destination_views_aggregate() {
        let mut app = app_with(three_flows());
        app.update(Action::SetView(View::Processes));
        let keys: Vec<&str> = app.groups.iter().map(|g| g.key.as_str()).collect();
        assert_eq!(keys, ["curl (42)", "wget (43)"]);
        assert_eq!(app.groups[0].flows, 2);
        assert_eq!(app.groups[0].live, 1);
        assert_eq!(app.groups[0].bytes_in, 200_000 + 120);
        app.update(Action::NextView);
        assert_eq!(app.view, View::Destinations);
        let keys: Vec<&str> = app.groups.iter().map(|g| g.key.as_str()).collect();
        assert_eq!(keys, ["example.test", "other.example.test", "198.18.1.2"]);
    }

    #[test]
    fn enter_on_a_group_scopes_the_flows_and_esc_goes_back() {
        let mut app = app_with(three_flows());
        app.update(Action::SetView(View::Processes));
        app.update(Action::Move(1));
        app.update(Action::Open);
        assert_eq!(app.view, View::Flows);
        assert_eq!(ids(&app), [2]);
        app.update(Action::Back);
        assert_eq!(app.view, View::Processes);
        assert_eq!(app.selected_group.as_deref(), Some("wget (43)"));
    }

    #[test]
    fn detail_opens_on_the_selection_and_follows_moves() {
        let mut app = app_with(three_flows());
        app.update(Action::Open);
        assert_eq!(app.detail_flow().map(|f| f.id), Some(1));
        app.update(Action::Move(1));
        assert_eq!(app.detail, Some(2));
        app.update(Action::Back);
        assert_eq!(app.detail, None);
    }

    #[test]
    fn pause_freezes_the_screen_but_not_the_history() {
        let mut app = app_with(three_flows());
        app.update(Action::TogglePause);
        let mut flows = three_flows();
        flows.push(established_flow(9));
        app.update(Action::Snapshot(Arc::new(snapshot(11, flows))));
        assert_eq!(app.rows.len(), 3, "frozen while paused");
        assert!(app.history.flow(9).is_some(), "history kept collecting");
        app.update(Action::TogglePause);
        assert_eq!(app.rows.len(), 4);
    }

    #[test]
    fn quitting_a_running_command_asks_twice() {
        let mut app = app_with(three_flows());
        assert_eq!(app.update(Action::Quit), Effect::None);
        assert!(app.notice.is_some());
        assert_eq!(app.update(Action::Quit), Effect::Quit);
        let mut app = app_with(three_flows());
        app.update(Action::CommandEnded(RunEnd { ts: T0, code: 0, status: "exit code 0".into() }));
        assert_eq!(app.update(Action::Quit), Effect::Quit);
    }

    #[test]
    fn the_command_pane_takes_keys_when_focused_and_resizes_its_pty() {
        let mut app = app_with(three_flows());
        let effect = app.update(app.key_action(key(KeyCode::Tab)).unwrap());
        assert_eq!(app.focus, Focus::Command);
        assert_eq!(effect, Effect::ResizeCommand(11, 78), "the pane grows when focused");
        let tab = key(KeyCode::Tab);
        assert_eq!(app.key_action(tab), Some(Action::CommandKey(tab)), "Tab reaches the command");
        assert_eq!(app.update(Action::CommandKey(tab)), Effect::WriteKey(tab));
        let escape = KeyEvent::new(KeyCode::Char(']'), KeyModifiers::CONTROL);
        app.update(app.key_action(escape).unwrap());
        assert_eq!(app.focus, Focus::Dashboard);
    }

    #[test]
    fn the_offset_keeps_the_selection_visible() {
        let flows: Vec<FlowRow> = (1..=40).map(|i| grown(established_flow(i), 41 - i)).collect();
        let mut app = app_with(flows);
        let height = app.layout().table_rows();
        app.update(Action::End);
        assert_eq!(app.selected_index(), Some(39));
        assert_eq!(app.offset, 40 - height);
        app.update(Action::Home);
        assert_eq!(app.offset, 0);
        app.update(Action::PageDown);
        assert_eq!(app.selected_index(), Some(height));
    }
}

/// How the dashboard copes with many flows. `cargo test -p childflow --release --lib
/// tui::app::scale -- --ignored --nocapture` prints the numbers; the assertions are loose
/// bounds that hold in debug builds too.
#[cfg(test)]
mod scale {
    use std::time::Instant;

    use ratatui::{buffer::Buffer, layout::Rect};

    use super::*;
    use crate::tui::model::fixtures::*;

    fn many(n: u64, growth: u64) -> Vec<FlowRow> {
        (1..=n)
            .map(|i| {
                let mut f = grown(established_flow(i), 1 + (i * 7919 + growth) % 97);
                f.name = Some(format!("host{}.example.test", i % 500));
                f
            })
            .collect()
    }

    #[test]
    #[ignore = "timing; run with --ignored --nocapture"]
    fn ten_thousand_flows() {
        const N: u64 = 10_000;
        let mut app = App::new(Arc::new(snapshot(1, many(N, 0))), true);
        app.update(Action::Resize(200, 60));
        let mut worst_update = 0f64;
        let mut worst_render = 0f64;
        for (i, key) in SortKey::ALL.iter().cycle().take(12).enumerate() {
            app.update(Action::Sort(*key));
            let snap = Arc::new(snapshot(2 + i as u64, many(N, i as u64)));
            let t = Instant::now();
            app.update(Action::Snapshot(snap));
            worst_update = worst_update.max(t.elapsed().as_secs_f64() * 1e3);
            let area = Rect::new(0, 0, 200, 60);
            let mut buf = Buffer::empty(area);
            let t = Instant::now();
            app.render_to(area, &mut buf, None);
            worst_render = worst_render.max(t.elapsed().as_secs_f64() * 1e3);
        }
        app.update(Action::SetView(View::Destinations));
        let t = Instant::now();
        app.update(Action::Snapshot(Arc::new(snapshot(50, many(N, 50)))));
        let aggregate = t.elapsed().as_secs_f64() * 1e3;
        let area = Rect::new(0, 0, 200, 60);
        let mut best_render = f64::MAX;
        for _ in 0..20 {
            let mut buf = Buffer::empty(area);
            let t = Instant::now();
            app.render_to(area, &mut buf, None);
            best_render = best_render.min(t.elapsed().as_secs_f64() * 1e3);
        }
        app.update(Action::SetView(View::Flows));
        let mut buf = Buffer::empty(area);
        let t = Instant::now();
        for _ in 0..20 {
            app.render_to(area, &mut buf, None);
        }
        let flows_render = t.elapsed().as_secs_f64() * 1e3 / 20.0;
        println!(
            "{N} flows: snapshot update (history + sort) worst {worst_update:.1} ms, \
             render 200x60 worst {worst_render:.2} ms (flows view, mean of 20: \
             {flows_render:.2} ms; destinations best {best_render:.2} ms), \
             destination view update {aggregate:.1} ms"
        );
        assert!(worst_update < 1000.0 && worst_render < 1000.0);
    }
}
