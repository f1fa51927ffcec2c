//! Workflows: the definition a user writes (chain, group, chord), checked
//! and planned into steps, each one job that waits for the steps before it.
//!
//! Pure: no Redis here. The broker stores a [`Plan`] and the scripts move
//! its jobs on as their dependencies end (see `broker::flows`).
//!
//! ```json
//! {"chord": {"group": [{"task": "scrape", "payload": {"url": "a"}},
//!                      {"task": "scrape", "payload": {"url": "b"}}],
//!            "then": {"task": "summarize", "payload": {}}}}
//! ```
//!
//! A node's *ends* are the steps whose results it yields: a step's is
//! itself, a chain's is its last node's, a group's is every member's
//! (in order), a chord's is its `then`'s. A node that comes after another
//! (the next in a chain, a chord's `then`) waits for that node's ends and
//! receives their results, in that order.
//!
//! Invariant: a flow is linear in size. The dependency between two nodes
//! is one [`Barrier`] (the ends before, the first steps after), never a
//! link per pair of steps: a group of 500 after a group of 500 is one
//! barrier of 500 members and 500 successors, not 250,000 pairs. A step
//! waits for at most one barrier and its end counts toward at most one
//! (a node's ends are consumed once, by the node after it), so a plan
//! holds at most two links per step.

use serde_json::{Map, Value};

use crate::limits;

/// What a step's failure does to the steps that wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// They end `cancelled`, naming the failed step (the default).
    Cancel,
    /// They run anyway; the failure is in their job context.
    Continue,
}

/// A node of a workflow definition.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// One job.
    Step {
        task: String,
        payload: Value,
        on_failure: Option<OnFailure>,
    },
    /// One after another.
    Chain {
        nodes: Vec<Node>,
        on_failure: Option<OnFailure>,
    },
    /// Side by side.
    Group {
        nodes: Vec<Node>,
        on_failure: Option<OnFailure>,
    },
    /// A group, then one node that receives all its results.
    Chord {
        group: Vec<Node>,
        then: Box<Node>,
        on_failure: Option<OnFailure>,
    },
}

/// Building a definition in Rust (the same tree a FLOW.json file holds):
///
/// ```
/// use serde_json::json;
/// use wasmq::flow::Node;
///
/// let pages = ["a", "b"].map(|url| Node::step("scrape", json!({ "url": url })));
/// let flow = Node::chord(pages, Node::step("summarize", json!({})));
/// assert!(wasmq::flow::plan_node(&flow).is_ok());
/// // then: broker.start_flow_node("acme", &flow, None).await?
/// ```
impl Node {
    /// One job of `task` with `payload`.
    pub fn step(task: &str, payload: Value) -> Node {
        Node::Step {
            task: task.to_string(),
            payload,
            on_failure: None,
        }
    }

    /// Nodes one after another.
    pub fn chain(nodes: impl IntoIterator<Item = Node>) -> Node {
        Node::Chain {
            nodes: nodes.into_iter().collect(),
            on_failure: None,
        }
    }

    /// Nodes side by side.
    pub fn group(nodes: impl IntoIterator<Item = Node>) -> Node {
        Node::Group {
            nodes: nodes.into_iter().collect(),
            on_failure: None,
        }
    }

    /// A group, then `then`, which receives every member's result.
    pub fn chord(group: impl IntoIterator<Item = Node>, then: Node) -> Node {
        Node::Chord {
            group: group.into_iter().collect(),
            then: Box::new(then),
            on_failure: None,
        }
    }

    /// The same node, with what a failure inside it does to what waits.
    pub fn on_failure(mut self, choice: OnFailure) -> Node {
        match &mut self {
            Node::Step { on_failure, .. }
            | Node::Chain { on_failure, .. }
            | Node::Group { on_failure, .. }
            | Node::Chord { on_failure, .. } => *on_failure = Some(choice),
        }
        self
    }

    /// The definition as JSON (what [`parse`] reads back).
    pub fn to_json(&self) -> Value {
        let (mut node, on_failure) = match self {
            Node::Step {
                task,
                payload,
                on_failure,
            } => (
                serde_json::json!({"task": task, "payload": payload}),
                on_failure,
            ),
            Node::Chain { nodes, on_failure } => (
                serde_json::json!({"chain": nodes.iter().map(Node::to_json).collect::<Vec<_>>()}),
                on_failure,
            ),
            Node::Group { nodes, on_failure } => (
                serde_json::json!({"group": nodes.iter().map(Node::to_json).collect::<Vec<_>>()}),
                on_failure,
            ),
            Node::Chord {
                group,
                then,
                on_failure,
            } => (
                serde_json::json!({"chord": {
                    "group": group.iter().map(Node::to_json).collect::<Vec<_>>(),
                    "then": then.to_json(),
                }}),
                on_failure,
            ),
        };
        match on_failure {
            Some(OnFailure::Continue) => node["on_failure"] = "continue".into(),
            Some(OnFailure::Cancel) => node["on_failure"] = "cancel".into(),
            None => {}
        }
        node
    }
}

/// One job of a planned flow.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedStep {
    /// The step's task.
    pub task: String,
    /// Its payload.
    pub payload: Value,
    /// Where it is in the definition (`chord.group[3]`), for messages.
    pub path: String,
    /// The barrier (index into [`Plan::barriers`]) it waits for; `None`
    /// for a step that goes on its queue at once.
    pub after: Option<usize>,
    /// The barrier its end counts toward; `None` when nothing comes after
    /// it (its result is part of the flow's).
    pub feeds: Option<usize>,
    /// Its own failure lets what waits on it run.
    pub on_failure: OnFailure,
}

/// Where one node's ends meet the node after it: the steps after wait for
/// every member to end, and then receive the members' results, in order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Barrier {
    /// The steps it waits for (the ends of the node before), in order.
    pub members: Vec<usize>,
    /// The steps that wait for it (the first steps of the node after).
    pub successors: Vec<usize>,
}

/// The shape of a flow's result: a step's result, or a list of shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultShape {
    /// The result of step N.
    Step(usize),
    /// A group's: one entry per member.
    List(Vec<ResultShape>),
}

impl ResultShape {
    /// Every step this shape names, in order.
    pub fn steps(&self) -> Vec<usize> {
        match self {
            ResultShape::Step(i) => vec![*i],
            ResultShape::List(items) => items.iter().flat_map(|s| s.steps()).collect(),
        }
    }

    /// As JSON with job ids: `"ID"` for a step, `[...]` for a list.
    pub fn to_json(&self, ids: &[String]) -> Value {
        match self {
            ResultShape::Step(i) => Value::String(ids[*i].clone()),
            ResultShape::List(items) => {
                Value::Array(items.iter().map(|s| s.to_json(ids)).collect())
            }
        }
    }

    /// The shape [`ResultShape::to_json`] wrote, with each job id mapped to
    /// a value by `lookup`.
    pub fn fill(shape: &Value, lookup: &mut dyn FnMut(&str) -> Value) -> Value {
        match shape {
            Value::String(id) => lookup(id),
            Value::Array(items) => {
                Value::Array(items.iter().map(|s| Self::fill(s, lookup)).collect())
            }
            other => other.clone(),
        }
    }
}

/// A definition, checked and laid out as steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Every step, in the order it appears in the definition; a step only
    /// waits for steps before it.
    pub steps: Vec<PlannedStep>,
    /// Every dependency between two nodes, in the order they were laid out.
    pub barriers: Vec<Barrier>,
    /// What the whole flow's result is made of.
    pub result: ResultShape,
}

impl Plan {
    /// The steps step `i` waits for (and whose results it receives), in order.
    pub fn waits_on(&self, i: usize) -> &[usize] {
        self.steps[i]
            .after
            .map_or(&[], |b| self.barriers[b].members.as_slice())
    }

    /// The steps that wait for step `i`.
    pub fn dependents(&self, i: usize) -> &[usize] {
        self.steps[i]
            .feeds
            .map_or(&[], |b| self.barriers[b].successors.as_slice())
    }
}

/// Parse and plan a definition; the error names the node at fault.
pub fn plan(definition: &str) -> Result<Plan, String> {
    let value: Value = serde_json::from_str(definition)
        .map_err(|e| format!("flow definition is not valid JSON: {e}"))?;
    let node = parse(&value, "flow")?;
    plan_node(&node)
}

/// Lay out a parsed definition.
pub fn plan_node(node: &Node) -> Result<Plan, String> {
    let mut plan = Plan {
        steps: Vec::new(),
        barriers: Vec::new(),
        result: ResultShape::List(Vec::new()),
    };
    let (_, result) = lay_out(node, None, OnFailure::Cancel, "flow", &mut plan)?;
    plan.result = result;
    Ok(plan)
}

/// Parse one node at `path`.
pub fn parse(value: &Value, path: &str) -> Result<Node, String> {
    let Value::Object(map) = value else {
        return Err(format!("{path}: a node is an object (a step `{{\"task\": ...}}`, or `chain`, `group` or `chord`)"));
    };
    let on_failure = on_failure(map, path)?;
    let kinds: Vec<&str> = ["task", "chain", "group", "chord"]
        .into_iter()
        .filter(|k| map.contains_key(*k))
        .collect();
    let kind = match kinds.as_slice() {
        [one] => *one,
        [] => {
            return Err(format!(
                "{path}: a node needs one of `task`, `chain`, `group` or `chord`"
            ))
        }
        many => {
            return Err(format!(
                "{path}: a node is one of `task`, `chain`, `group` or `chord`, not {}",
                many.join(" and ")
            ))
        }
    };
    let allowed: &[&str] = match kind {
        "task" => &["task", "payload", "on_failure"],
        _ => &[kind, "on_failure"],
    };
    if let Some(extra) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!(
            "{path}: unknown field `{extra}` in a `{kind}` node"
        ));
    }
    match kind {
        "task" => {
            let Some(task) = map["task"].as_str() else {
                return Err(format!("{path}.task: a task name is a string"));
            };
            limits::check_name("task name", task, limits::MAX_NAME_BYTES)
                .map_err(|e| format!("{path}.task: {e}"))?;
            Ok(Node::Step {
                task: task.to_string(),
                payload: map
                    .get("payload")
                    .cloned()
                    .unwrap_or(Value::Object(Map::new())),
                on_failure,
            })
        }
        "chain" => Ok(Node::Chain {
            nodes: members(&map["chain"], &format!("{path}.chain"))?,
            on_failure,
        }),
        "group" => Ok(Node::Group {
            nodes: members(&map["group"], &format!("{path}.group"))?,
            on_failure,
        }),
        _ => {
            let chord_path = format!("{path}.chord");
            let Value::Object(chord) = &map["chord"] else {
                return Err(format!(
                    "{chord_path}: a chord is `{{\"group\": [...], \"then\": NODE}}`"
                ));
            };
            if let Some(extra) = chord.keys().find(|k| *k != "group" && *k != "then") {
                return Err(format!(
                    "{chord_path}: unknown field `{extra}` (a chord has `group` and `then`)"
                ));
            }
            let group = members(
                chord.get("group").unwrap_or(&Value::Null),
                &format!("{chord_path}.group"),
            )?;
            let then = chord
                .get("then")
                .ok_or_else(|| format!("{chord_path}: a chord needs `then`, the node that receives the group's results"))?;
            Ok(Node::Chord {
                group,
                then: Box::new(parse(then, &format!("{chord_path}.then"))?),
                on_failure,
            })
        }
    }
}

fn on_failure(map: &Map<String, Value>, path: &str) -> Result<Option<OnFailure>, String> {
    match map.get("on_failure") {
        None => Ok(None),
        Some(Value::String(s)) if s == "cancel" => Ok(Some(OnFailure::Cancel)),
        Some(Value::String(s)) if s == "continue" => Ok(Some(OnFailure::Continue)),
        Some(other) => Err(format!(
            "{path}.on_failure: `cancel` or `continue`, not {other}"
        )),
    }
}

fn members(value: &Value, path: &str) -> Result<Vec<Node>, String> {
    let Value::Array(items) = value else {
        return Err(format!("{path}: a list of nodes"));
    };
    if items.is_empty() {
        return Err(format!(
            "{path}: an empty list (a flow step needs at least one node)"
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| parse(item, &format!("{path}[{i}]")))
        .collect()
}

/// Lay out `node` after barrier `after` (none: it starts at once),
/// inheriting `inherited`; its ends and result shape.
fn lay_out(
    node: &Node,
    after: Option<usize>,
    inherited: OnFailure,
    path: &str,
    plan: &mut Plan,
) -> Result<(Vec<usize>, ResultShape), String> {
    let own = |o: &Option<OnFailure>| o.unwrap_or(inherited);
    match node {
        Node::Step {
            task,
            payload,
            on_failure,
        } => {
            if plan.steps.len() >= limits::MAX_FLOW_STEPS {
                return Err(format!(
                    "{path}: a flow has at most {} steps",
                    limits::MAX_FLOW_STEPS
                ));
            }
            let i = plan.steps.len();
            plan.steps.push(PlannedStep {
                task: task.clone(),
                payload: payload.clone(),
                path: path.to_string(),
                after,
                feeds: None,
                on_failure: own(on_failure),
            });
            if let Some(b) = after {
                plan.barriers[b].successors.push(i);
            }
            Ok((vec![i], ResultShape::Step(i)))
        }
        Node::Chain { nodes, on_failure } => {
            non_empty(nodes, &format!("{path}.chain"))?;
            let mut out = (Vec::new(), ResultShape::List(Vec::new()));
            let mut after = after;
            for (i, n) in nodes.iter().enumerate() {
                if i > 0 {
                    after = Some(barrier(&out.0, plan));
                }
                out = lay_out(
                    n,
                    after,
                    own(on_failure),
                    &format!("{path}.chain[{i}]"),
                    plan,
                )?;
            }
            Ok(out)
        }
        Node::Group { nodes, on_failure } => group(
            nodes,
            after,
            own(on_failure),
            &format!("{path}.group"),
            plan,
        ),
        Node::Chord {
            group: members,
            then,
            on_failure,
        } => {
            let inherit = own(on_failure);
            let (ends, _) = group(
                members,
                after,
                inherit,
                &format!("{path}.chord.group"),
                plan,
            )?;
            let then_after = barrier(&ends, plan);
            lay_out(
                then,
                Some(then_after),
                inherit,
                &format!("{path}.chord.then"),
                plan,
            )
        }
    }
}

/// A node built in Rust may hold an empty list, which a definition read
/// from JSON cannot ([`parse`] refuses it): refuse it the same way, so a
/// node with no ends never leaves the steps after it waiting for nothing.
fn non_empty(nodes: &[Node], path: &str) -> Result<(), String> {
    match nodes {
        [] => Err(format!(
            "{path}: an empty list (a flow step needs at least one node)"
        )),
        _ => Ok(()),
    }
}

/// A new barrier whose members are `ends` (the node just laid out); the
/// node laid out next waits for it.
fn barrier(ends: &[usize], plan: &mut Plan) -> usize {
    let b = plan.barriers.len();
    for &end in ends {
        // A node's ends are consumed once, by the node after it.
        debug_assert_eq!(plan.steps[end].feeds, None, "step {end} feeds two barriers");
        plan.steps[end].feeds = Some(b);
    }
    plan.barriers.push(Barrier {
        members: ends.to_vec(),
        successors: Vec::new(),
    });
    b
}

fn group(
    nodes: &[Node],
    after: Option<usize>,
    inherited: OnFailure,
    path: &str,
    plan: &mut Plan,
) -> Result<(Vec<usize>, ResultShape), String> {
    non_empty(nodes, path)?;
    let mut ends = Vec::new();
    let mut shapes = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let (e, s) = lay_out(n, after, inherited, &format!("{path}[{i}]"), plan)?;
        ends.extend(e);
        shapes.push(s);
    }
    Ok((ends, ResultShape::List(shapes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(i: usize, plan: &Plan) -> (&str, Vec<usize>, OnFailure) {
        let s = &plan.steps[i];
        (s.task.as_str(), plan.waits_on(i).to_vec(), s.on_failure)
    }

    #[test]
    fn a_chain_passes_each_end_on() {
        let p = plan(r#"{"chain": [{"task": "a"}, {"task": "b"}, {"task": "c"}]}"#).unwrap();
        assert_eq!(step(0, &p), ("a", vec![], OnFailure::Cancel));
        assert_eq!(step(1, &p), ("b", vec![0], OnFailure::Cancel));
        assert_eq!(step(2, &p), ("c", vec![1], OnFailure::Cancel));
        assert_eq!(p.result, ResultShape::Step(2));
        let dependents: Vec<&[usize]> = (0..3).map(|i| p.dependents(i)).collect();
        assert_eq!(dependents, vec![&[1][..], &[2], &[]]);
    }

    #[test]
    fn a_chord_waits_for_every_member_and_nested_ends() {
        let p = plan(
            r#"{"chord": {"group": [{"task": "a"}, {"chain": [{"task": "b"}, {"task": "c"}]}],
                "then": {"task": "d", "payload": {"x": 1}}}, "on_failure": "continue"}"#,
        )
        .unwrap();
        assert_eq!(step(3, &p), ("d", vec![0, 2], OnFailure::Continue));
        assert_eq!(p.steps[3].payload["x"], 1);
        assert_eq!(p.steps[3].path, "flow.chord.then");
        assert_eq!(p.result, ResultShape::Step(3));
    }

    #[test]
    fn a_group_after_a_step_fans_out_and_its_result_is_a_list() {
        let p = plan(
            r#"{"chain": [{"task": "a"}, {"group": [{"task": "b"}, {"task": "c", "on_failure": "continue"}]}]}"#,
        )
        .unwrap();
        assert_eq!(step(1, &p), ("b", vec![0], OnFailure::Cancel));
        assert_eq!(step(2, &p), ("c", vec![0], OnFailure::Continue));
        assert_eq!(
            p.result,
            ResultShape::List(vec![ResultShape::Step(1), ResultShape::Step(2)])
        );
        let ids = vec!["x".to_string(), "y".to_string(), "z".to_string()];
        assert_eq!(p.result.to_json(&ids), serde_json::json!(["y", "z"]));
    }

    #[test]
    fn a_group_after_a_group_is_one_barrier_not_every_pair() {
        let members = |n: usize| vec![r#"{"task": "a"}"#; n].join(",");
        let p = plan(&format!(
            r#"{{"chain": [{{"group": [{}]}}, {{"group": [{}]}}]}}"#,
            members(500),
            members(500)
        ))
        .unwrap();
        assert_eq!(p.barriers.len(), 1);
        let links: usize = p
            .barriers
            .iter()
            .map(|b| b.members.len() + b.successors.len())
            .sum();
        assert_eq!(links, 1_000);
        assert_eq!(p.waits_on(999), (0..500).collect::<Vec<_>>().as_slice());
        assert_eq!(p.dependents(0), (500..1000).collect::<Vec<_>>().as_slice());
        assert_eq!((p.steps[0].after, p.steps[0].feeds), (None, Some(0)));
        assert_eq!((p.steps[999].after, p.steps[999].feeds), (Some(0), None));
    }

    #[test]
    fn a_nested_chain_feeds_the_barrier_of_what_follows_its_group() {
        // chain[group[chain[a, b], c], d]: d waits for b and c; b for a.
        let p = plan(
            r#"{"chain": [{"group": [{"chain": [{"task": "a"}, {"task": "b"}]}, {"task": "c"}]},
                {"task": "d"}]}"#,
        )
        .unwrap();
        assert_eq!(step(1, &p).1, vec![0]);
        assert_eq!(step(2, &p).1, Vec::<usize>::new());
        assert_eq!(step(3, &p).1, vec![1, 2]);
        assert_eq!(p.dependents(0), &[1]);
        assert_eq!(p.dependents(2), &[3]);
        assert_eq!(p.barriers.len(), 2);
    }

    #[test]
    fn an_empty_list_built_in_rust_is_refused_as_in_json() {
        let node = Node::chain([Node::step("a", Value::Null), Node::group([])]);
        let err = plan_node(&node).unwrap_err();
        assert!(err.contains("flow.chain[1].group: an empty list"), "{err}");
    }

    #[test]
    fn bad_definitions_name_the_node() {
        for (text, expect) in [
            ("[]", "flow: a node is an object"),
            (r#"{"chain": []}"#, "flow.chain: an empty list"),
            (
                r#"{"group": [{"tsk": "a"}]}"#,
                "flow.group[0]: a node needs one of",
            ),
            (r#"{"task": "a", "chain": []}"#, "not task and chain"),
            (
                r#"{"task": "a", "payload": 1, "retry": 3}"#,
                "unknown field `retry`",
            ),
            (r#"{"chord": {"group": [{"task": "a"}]}}"#, "needs `then`"),
            (
                r#"{"task": "a", "on_failure": "ignore"}"#,
                "`cancel` or `continue`",
            ),
            (r#"{"task": ""}"#, "flow.task:"),
            ("{", "not valid JSON"),
        ] {
            let err = plan(text).unwrap_err();
            assert!(err.contains(expect), "{text}: {err}");
        }
    }

    #[test]
    fn built_nodes_round_trip_through_json() {
        let node = Node::chain([
            Node::step("a", serde_json::json!({"n": 1})),
            Node::chord(
                [Node::step("b", Value::Null), Node::step("c", Value::Null)],
                Node::step("d", Value::Null).on_failure(OnFailure::Continue),
            ),
        ])
        .on_failure(OnFailure::Cancel);
        assert_eq!(parse(&node.to_json(), "flow").unwrap(), node);
        assert_eq!(plan_node(&node).unwrap().steps.len(), 4);
    }

    #[test]
    fn a_flow_is_bounded() {
        let steps: Vec<String> = (0..=limits::MAX_FLOW_STEPS)
            .map(|_| r#"{"task": "a"}"#.to_string())
            .collect();
        let err = plan(&format!(r#"{{"group": [{}]}}"#, steps.join(","))).unwrap_err();
        assert!(err.contains("at most"), "{err}");
    }
}
