//! What the CLI prints for people: aligned tables, where a device is held, and device
//! strings made safe for a terminal.

use crate::model::alias::Ownership;
use crate::reconcile::Placement;

pub fn where_is(placement: &Placement, known: bool) -> String {
    if !known {
        return "?".to_string();
    }
    if placement.holders.is_empty() {
        return "host".to_string();
    }
    placement
        .holders
        .iter()
        .map(|holder| {
            let alias = holder.alias.as_deref().unwrap_or("-");
            match holder.ownership {
                Ownership::Foreign => format!("{} ({alias}, not usbpass)", holder.domain),
                _ => format!("{} ({alias})", holder.domain),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Device strings come from the device: a control character in a serial must not reach
/// the terminal as an escape sequence.
pub fn printable(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        text.to_string()
    }
}

pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| printable(cell)).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len() - 1;
        let text: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, cell)| {
                if i == last {
                    cell
                } else {
                    format!("{cell:<width$}", width = widths[i])
                }
            })
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}
