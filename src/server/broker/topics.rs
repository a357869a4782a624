//! Topic names and filters (MQTT 3.1.1 section 4.7): whether a filter matches a topic, with
//! `+`, `#` and the rule that a filter starting with a wildcard does not match a topic starting
//! with `$`; and [`Index`], the subscription index the router looks topics up in — a tree of
//! levels, so a lookup walks the topic's levels once whatever the number of subscriptions.

use std::collections::HashMap;

/// Whether `filter` (a valid filter) matches `topic` (a valid topic name).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    levels_match(filter, topic)
}

/// Whether the filter's levels match the topic's, wildcards as MQTT has them (no `$` rule).
pub fn levels_match(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic could match both filters (for an ACL deny that might cover part of a
/// subscription).
pub fn intersect(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(p), Some(q)) if p == q => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A valid topic name to publish to: not empty, no wildcard, no U+0000, at most 65,535 bytes.
pub fn valid_topic(t: &str) -> bool {
    !t.is_empty() && t.len() <= 65_535 && !t.contains(['+', '#', '\0'])
}

/// One level of the index.
#[derive(Debug)]
struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    /// Subscriptions whose filter ends here.
    here: Vec<V>,
    /// Subscriptions whose filter ends here with `/#` (or is `#` at the root).
    rest: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            here: Vec::new(),
            rest: Vec::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.rest.is_empty()
    }
}

/// Subscriptions by filter: `V` identifies a subscriber (a session and its QoS, say). A filter
/// may hold many values; [`Index::lookup`] gives every value whose filter matches a topic.
#[derive(Debug)]
pub struct Index<V> {
    root: Node<V>,
    len: usize,
}

impl<V> Default for Index<V> {
    fn default() -> Self {
        Index {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V: PartialEq> Index<V> {
    /// Adds `v` under `filter` (replacing an equal value there).
    pub fn insert(&mut self, filter: &str, v: V) {
        let mut node = &mut self.root;
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, l) in levels.iter().enumerate() {
            if *l == "#" && i + 1 == levels.len() {
                if let Some(old) = node.rest.iter_mut().find(|x| **x == v) {
                    *old = v;
                } else {
                    node.rest.push(v);
                    self.len += 1;
                }
                return;
            }
            node = node.children.entry((*l).into()).or_default();
        }
        if let Some(old) = node.here.iter_mut().find(|x| **x == v) {
            *old = v;
        } else {
            node.here.push(v);
            self.len += 1;
        }
    }

    /// Removes the values under `filter` that `pred` picks; how many went.
    pub fn remove(&mut self, filter: &str, pred: impl Fn(&V) -> bool) -> usize {
        let levels: Vec<&str> = filter.split('/').collect();
        let n = remove_at(&mut self.root, &levels, &pred);
        self.len -= n;
        n
    }

    /// Every value whose filter matches `topic`.
    pub fn lookup<'a>(&'a self, topic: &str, out: &mut Vec<&'a V>) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        collect(&self.root, &levels, 0, dollar, out);
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn remove_at<V>(node: &mut Node<V>, levels: &[&str], pred: &impl Fn(&V) -> bool) -> usize {
    match levels {
        ["#"] => {
            let before = node.rest.len();
            node.rest.retain(|v| !pred(v));
            before - node.rest.len()
        }
        [] => {
            let before = node.here.len();
            node.here.retain(|v| !pred(v));
            before - node.here.len()
        }
        [first, rest @ ..] => {
            let Some(child) = node.children.get_mut(*first) else {
                return 0;
            };
            let n = remove_at(child, rest, pred);
            if child.is_empty() {
                node.children.remove(*first);
            }
            n
        }
    }
}

fn collect<'a, V>(
    node: &'a Node<V>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    out: &mut Vec<&'a V>,
) {
    // a filter beginning with a wildcard does not match a topic beginning with `$`
    let wild_ok = !(dollar && depth == 0);
    if wild_ok {
        out.extend(node.rest.iter());
    }
    match levels.split_first() {
        None => out.extend(node.here.iter()),
        Some((first, rest)) => {
            if let Some(child) = node.children.get(*first) {
                collect(child, rest, depth + 1, dollar, out);
            }
            if wild_ok && let Some(child) = node.children.get("+") {
                collect(child, rest, depth + 1, dollar, out);
            }
        }
    }
}

/// One level of a [`Tree`].
#[derive(Debug)]
struct TreeNode<V> {
    children: HashMap<Box<str>, TreeNode<V>>,
    value: Option<V>,
}

impl<V> Default for TreeNode<V> {
    fn default() -> Self {
        TreeNode {
            children: HashMap::new(),
            value: None,
        }
    }
}

/// Values stored at topic names (the retained messages): [`Tree::matching`] walks a filter's
/// levels, so a subscription finds its retained messages without looking at the others.
#[derive(Debug)]
pub struct Tree<V> {
    root: TreeNode<V>,
    len: usize,
}

impl<V> Default for Tree<V> {
    fn default() -> Self {
        Tree {
            root: TreeNode::default(),
            len: 0,
        }
    }
}

impl<V> Tree<V> {
    /// Stores `v` at `topic`, returning what was there.
    pub fn insert(&mut self, topic: &str, v: V) -> Option<V> {
        let mut node = &mut self.root;
        for l in topic.split('/') {
            node = node.children.entry(l.into()).or_default();
        }
        let old = node.value.replace(v);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes the value at `topic`.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        let levels: Vec<&str> = topic.split('/').collect();
        let old = tree_remove(&mut self.root, &levels);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// The value at `topic`.
    pub fn get(&self, topic: &str) -> Option<&V> {
        let mut node = &self.root;
        for l in topic.split('/') {
            node = node.children.get(l)?;
        }
        node.value.as_ref()
    }

    /// Every value whose topic `filter` matches.
    pub fn matching<'a>(&'a self, filter: &str, out: &mut Vec<&'a V>) {
        let levels: Vec<&str> = filter.split('/').collect();
        tree_walk(&self.root, &levels, 0, out);
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn tree_remove<V>(node: &mut TreeNode<V>, levels: &[&str]) -> Option<V> {
    match levels.split_first() {
        None => node.value.take(),
        Some((first, rest)) => {
            let child = node.children.get_mut(*first)?;
            let old = tree_remove(child, rest);
            if child.value.is_none() && child.children.is_empty() {
                node.children.remove(*first);
            }
            old
        }
    }
}

fn tree_all<'a, V>(node: &'a TreeNode<V>, root: bool, out: &mut Vec<&'a V>) {
    out.extend(node.value.iter());
    for (name, child) in &node.children {
        if !(root && name.starts_with('$')) {
            tree_all(child, false, out);
        }
    }
}

fn tree_walk<'a, V>(node: &'a TreeNode<V>, levels: &[&str], depth: usize, out: &mut Vec<&'a V>) {
    match levels.split_first() {
        None => out.extend(node.value.iter()),
        Some((&"#", _)) => tree_all(node, depth == 0, out),
        Some((&"+", rest)) => {
            for (name, child) in &node.children {
                // a filter beginning with a wildcard does not match a topic beginning with `$`
                if !(depth == 0 && name.starts_with('$')) {
                    tree_walk(child, rest, depth + 1, out);
                }
            }
        }
        Some((first, rest)) => {
            if let Some(child) = node.children.get(*first) {
                tree_walk(child, rest, depth + 1, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_mqtt_says() {
        for (f, t, want) in [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+/+", "/a", true),
            ("+", "/a", false),
            ("/+", "/a", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/+/c", "a//c", true),
            ("a/b", "a/b/", false),
        ] {
            assert_eq!(matches(f, t), want, "{f} vs {t}");
        }
    }

    #[test]
    fn filters_intersect_when_a_topic_could_match_both() {
        assert!(intersect("a/#", "a/b/c"));
        assert!(intersect("a/+/c", "a/b/+"));
        assert!(!intersect("a/b", "a/c"));
        assert!(!intersect("a/+", "a/b/c"));
        assert!(intersect("#", "x"));
    }

    #[test]
    fn the_index_finds_exactly_the_matching_filters() {
        let filters = [
            "a/b", "a/+", "a/#", "#", "+/+", "/+", "+", "$SYS/#", "a/b/c", "+/b/#",
        ];
        let mut idx = Index::default();
        for (i, f) in filters.iter().enumerate() {
            idx.insert(f, i);
        }
        assert_eq!(idx.len(), filters.len());
        for topic in [
            "a/b",
            "a",
            "a/b/c",
            "/x",
            "x",
            "$SYS/load",
            "q/b",
            "q/b/z/z",
        ] {
            let mut got = Vec::new();
            idx.lookup(topic, &mut got);
            let mut got: Vec<usize> = got.into_iter().copied().collect();
            got.sort();
            let want: Vec<usize> = (0..filters.len())
                .filter(|i| matches(filters[*i], topic))
                .collect();
            assert_eq!(got, want, "{topic}");
        }
        assert_eq!(idx.remove("a/#", |v| *v == 2), 1);
        assert_eq!(idx.remove("a/#", |v| *v == 2), 0);
        assert_eq!(idx.remove("nothing/here", |_| true), 0);
        let mut got = Vec::new();
        idx.lookup("a/b/c", &mut got);
        assert!(!got.contains(&&2));
        for (i, f) in filters.iter().enumerate() {
            idx.remove(f, |v| *v == i);
        }
        assert!(idx.is_empty());
        assert!(idx.root.is_empty(), "empty levels are pruned");
    }

    #[test]
    fn the_tree_finds_exactly_the_topics_a_filter_matches() {
        let topics = [
            "a",
            "a/b",
            "a/b/c",
            "/x",
            "x",
            "$SYS/load",
            "q/b",
            "a//c",
            "$SYS",
        ];
        let mut tree = Tree::default();
        for (i, t) in topics.iter().enumerate() {
            assert!(tree.insert(t, i).is_none());
        }
        assert_eq!(tree.insert("a/b", 1), Some(1));
        assert_eq!(tree.len(), topics.len());
        for filter in [
            "#", "a/#", "+", "+/+", "a/+", "a/+/c", "$SYS/#", "$SYS", "+/b", "/+", "zz/#",
        ] {
            let mut got = Vec::new();
            tree.matching(filter, &mut got);
            let mut got: Vec<usize> = got.into_iter().copied().collect();
            got.sort();
            let want: Vec<usize> = (0..topics.len())
                .filter(|i| matches(filter, topics[*i]))
                .collect();
            assert_eq!(got, want, "{filter}");
        }
        assert_eq!(tree.get("a/b/c"), Some(&2));
        assert_eq!(tree.remove("a/b"), Some(1));
        assert_eq!(tree.remove("a/b"), None);
        assert_eq!(tree.get("a/b/c"), Some(&2), "children stay");
        for t in topics {
            tree.remove(t);
        }
        assert!(tree.is_empty());
        assert!(tree.root.children.is_empty(), "empty levels are pruned");
    }
}
