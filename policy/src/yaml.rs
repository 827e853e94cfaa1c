//! A YAML tree whose every node knows its line and column, built from yaml-rust2's
//! event parser, so that validation errors can name file:line:col of the offending value.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `plain` is false for quoted and block scalars: `"true"` is a string, `true` a bool.
    Scalar {
        value: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub kind: Kind,
    pub pos: Pos,
}

impl Node {
    /// A plain `~`, `null` or empty scalar.
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { value, plain: true } if value.is_empty() || value == "~" || value == "null" || value == "Null" || value == "NULL")
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            _ if self.is_null() => "null",
            Kind::Scalar { .. } => "a scalar",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

enum Frame {
    Seq(Vec<Node>, Pos, usize),
    Map(Vec<(Node, Node)>, Option<Node>, Pos, usize),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    docs: Vec<(Node, Pos)>,
    doc_start: Option<Pos>,
    anchors: HashMap<usize, Node>,
    error: Option<SyntaxError>,
}

fn pos(m: Marker) -> Pos {
    // yaml-rust2 markers: line is 1-based, column 0-based.
    Pos {
        line: m.line(),
        column: m.col() + 1,
    }
}

impl Builder {
    fn attach(&mut self, node: Node, anchor: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            Some(Frame::Seq(items, ..)) => items.push(node),
            Some(Frame::Map(pairs, key, ..)) => match key.take() {
                None => *key = Some(node),
                Some(k) => pairs.push((k, node)),
            },
            None => {
                let start = self.doc_start.take().unwrap_or(node.pos);
                self.docs.push((node, start));
            }
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let p = pos(mark);
        match ev {
            Event::DocumentStart => self.doc_start = Some(p),
            Event::Scalar(value, style, anchor, _) => {
                let plain = style == TScalarStyle::Plain;
                self.attach(
                    Node {
                        kind: Kind::Scalar { value, plain },
                        pos: p,
                    },
                    anchor,
                );
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(n) => self.attach(Node { pos: p, ..n }, 0),
                None => {
                    self.error = Some(SyntaxError {
                        pos: p,
                        message: "alias to an unknown anchor".into(),
                    })
                }
            },
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq(Vec::new(), p, anchor)),
            Event::MappingStart(anchor, _) => {
                self.stack.push(Frame::Map(Vec::new(), None, p, anchor))
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq(items, p, a)) => (
                        Node {
                            kind: Kind::Seq(items),
                            pos: p,
                        },
                        a,
                    ),
                    Some(Frame::Map(pairs, _, p, a)) => {
                        // A block mapping's start event is marked after its first
                        // key; report the earlier of the two.
                        let first = pairs.first().map_or(p, |(k, _)| k.pos);
                        let p = if (first.line, first.column) < (p.line, p.column) {
                            first
                        } else {
                            p
                        };
                        (
                            Node {
                                kind: Kind::Map(pairs),
                                pos: p,
                            },
                            a,
                        )
                    }
                    None => return,
                };
                self.attach(node, anchor);
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

/// Parses every document of a YAML stream. Each document comes with the position of its
/// start (the `---` line, or its first node).
pub fn parse(text: &str) -> Result<Vec<(Node, Pos)>, SyntaxError> {
    let mut b = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser.load(&mut b, true).map_err(|e| SyntaxError {
        pos: pos(*e.marker()),
        message: e.info().to_owned(),
    })?;
    match b.error {
        Some(e) => Err(e),
        None => Ok(b.docs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let docs = parse("a: 1\nb:\n  - x\n  - y\n---\nc: 2\n").unwrap();
        assert_eq!(docs.len(), 2);
        let Kind::Map(pairs) = &docs[0].0.kind else {
            panic!()
        };
        assert_eq!(pairs[0].0.pos, Pos { line: 1, column: 1 });
        assert_eq!(pairs[0].1.pos, Pos { line: 1, column: 4 });
        let Kind::Seq(items) = &pairs[1].1.kind else {
            panic!()
        };
        assert_eq!(items[1].pos, Pos { line: 4, column: 5 });
        assert_eq!(docs[1].1.line, 5);
        assert_eq!(docs[1].0.pos, Pos { line: 6, column: 1 });
        assert_eq!(docs[0].0.pos, Pos { line: 1, column: 1 });
    }

    #[test]
    fn syntax_errors_have_positions() {
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1, "{e:?}");
        let e = parse("a: *nope\n").unwrap_err();
        assert_eq!(e.pos.line, 1);
    }

    #[test]
    fn anchors_and_aliases() {
        let docs = parse("a: &x [1]\nb: *x\n").unwrap();
        let Kind::Map(pairs) = &docs[0].0.kind else {
            panic!()
        };
        assert_eq!(pairs[0].1.kind, pairs[1].1.kind);
    }

    #[test]
    fn quoted_scalars_are_not_plain() {
        let docs = parse("a: 'true'\nb: true\n").unwrap();
        let Kind::Map(pairs) = &docs[0].0.kind else {
            panic!()
        };
        assert!(matches!(pairs[0].1.kind, Kind::Scalar { plain: false, .. }));
        assert!(matches!(pairs[1].1.kind, Kind::Scalar { plain: true, .. }));
    }
}
