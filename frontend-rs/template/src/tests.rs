//! Unit tests of the renderer (expected strings from jinja2 3.1 with shoal's settings).

use super::*;
use serde_json::json;

fn render(src: &str, messages: serde_json::Value) -> Result<String, String> {
    ChatTemplate::compile(src)?.render(&messages, true, Some("<s>"), Some("</s>"), &json!({}))
}

fn r(src: &str) -> String {
    render(src, json!([])).unwrap_or_else(|e| panic!("{}: {}", src, e))
}

#[test]
fn compiled_templates_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ChatTemplate>();
}

#[test]
fn for_loop_scoping_and_loop_variable() {
    assert_eq!(
        r("{% for x in [1,2,3] %}{% if loop.first %}{% set y = 1 %}{% endif %}[{{ y }}]{% endfor %}{{ y }}"),
        "[1][][]"
    );
    assert_eq!(
        r("{% set y = 5 %}{% for x in [1,2,3] %}{{ y }}{% set y = x %}{{ y }}{% endfor %}{{ y }}"),
        "5152535"
    );
    assert_eq!(r("{% for a in [1,2] %}{{ loop.previtem }}{{ loop.nextitem }}{{ loop.revindex }}{% endfor %}"), "2211");
    assert_eq!(r("{% for x in [1,2,3,4] if x is even %}{{ loop.index }}/{{ loop.length }}{{ x }} {% endfor %}"), "1/22 2/24 ");
    assert_eq!(r("{% for x in [] %}a{% else %}empty{% endfor %}"), "empty");
    assert_eq!(
        r("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}"),
        "a=1;b=2;"
    );
    assert_eq!(r("{% for x in [1,2,3,4] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}"), "13");
}

#[test]
fn namespaces_carry_state_out_of_loops() {
    assert_eq!(
        r("{% set ns = namespace(found=false, n=0) %}{% for x in [1,2] %}{% set ns.n = ns.n + x %}{% set ns.found = true %}{% endfor %}{{ ns.found }}{{ ns.n }}{{ ns }}"),
        "True3<Namespace {'found': True, 'n': 3}>"
    );
}

#[test]
fn expressions_follow_python() {
    assert_eq!(r("{{ 7 // 2 }}{{ -7 // 2 }}{{ -7 % 3 }}{{ 7 / 2 }}{{ 2 ** 10 }}{{ 1 == 1.0 }}{{ true == 1 }}"), "3-423.51024TrueTrue");
    assert_eq!(
        r("{{ 'abc'[::-1] }}{{ 'abc'[5:] }}{{ [1,2,3][-1] }}{{ [1,2,3][1:] }}"),
        "cba3[2, 3]"
    );
    assert_eq!(
        r("{{ 'a' if false }}{{ 'b' if 0 else 'c' }}{{ none or 'd' }}{{ 'x' and 'y' }}"),
        "cdy"
    );
    assert_eq!(
        r("{{ 'b' in 'abc' }}{{ 2 not in [1,2] }}{{ 'k' in {'k': 1} }}"),
        "TrueFalseTrue"
    );
    assert_eq!(
        r("{{ [1, 'a', None, 1.5, {'k': \"it's\"}] }}{{ 1e20 }}{{ 2/1 }}{{ (1,2) }}"),
        "[1, 'a', None, 1.5, {'k': \"it's\"}]1e+202.0(1, 2)"
    );
    assert_eq!(r("{{ 1 ~ none ~ undefined_name ~ true }}"), "1NoneTrue");
    assert_eq!(r("{{ {'a': {'b': 1}}['a'].b }}"), "1");
}

#[test]
fn undefined_behaves_like_jinja_default() {
    assert_eq!(
        r("{{ x }}|{{ x is defined }}|{{ x|length }}|{{ x|default('d') }}"),
        "|False|0|d"
    );
    assert_eq!(render("{{ messages[0].foo }}", json!([{}])).unwrap(), "");
    let e = render("{{ messages[0].foo.bar }}", json!([{}])).unwrap_err();
    assert!(e.contains("'dict object' has no attribute 'foo'"), "{}", e);
    assert!(render("{{ x.y }}", json!([]))
        .unwrap_err()
        .contains("'x' is undefined"));
    assert!(render("{{ m + 1 }}", json!([])).is_err());
}

#[test]
fn filters_and_methods() {
    assert_eq!(r("{{ '  a b  '|trim }}|{{ 'hello world-foo (bar'|title }}|{{ 'aBc'|upper }}{{ 'aBc'|lower }}|{{ 'abc'|capitalize }}"), "a b|Hello World-Foo (Bar|ABCabc|Abc");
    assert_eq!(r("{{ [1,2,3]|join(', ') }}|{{ [3,1,2]|sort|first }}{{ [3,1,2]|last }}|{{ '5'|int + 1 }}|{{ 'x'|int }}"), "1, 2, 3|12|6|0");
    assert_eq!(r("{{ [{'a': 1}, {'a': 2}]|map(attribute='a')|list }}{{ [{'a': 1}, {'b': 2}]|selectattr('a', 'defined')|list }}"), "[1, 2][{'a': 1}]");
    assert_eq!(r("{{ ' a '.strip() }}|{{ 'a,b'.split(',') }}|{{ 'a b  c'.split() }}|{{ 'abc'.startswith('ab') }}|{{ {'a': 1}.get('b', 2) }}"), "a|['a', 'b']|['a', 'b', 'c']|True|2");
    assert_eq!(
        r("{{ {'b': 1, 'a': [1, 2.5, none, true, '<é>\n']}|tojson }}"),
        "{\"b\": 1, \"a\": [1, 2.5, null, true, \"<é>\\n\"]}"
    );
    assert_eq!(
        r("{{ {'b': 1, 'a': 2}|tojson(indent=2, sort_keys=true) }}"),
        "{\n  \"a\": 2,\n  \"b\": 1\n}"
    );
    assert_eq!(
        r("{{ 'a\nb'|indent(2) }}|{{ 'x'|replace('x', 'y') }}|{{ {'a': 1}|items|list }}"),
        "a\n  b|y|[('a', 1)]"
    );
}

#[test]
fn macros_and_set_blocks() {
    assert_eq!(
        r("{% macro f(a, b='B') %}<{{ a }}{{ b }}>{% endmacro %}{{ f(1) }}{{ f(1, b=2) }}"),
        "<1B><12>"
    );
    assert_eq!(r("{% set x %}in{{ 1 }}{% endset %}[{{ x }}]"), "[in1]");
    let e = render(
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
        json!([]),
    )
    .unwrap_err();
    assert!(e.contains("RecursionError"), "{}", e);
}

#[test]
fn raise_exception_surfaces_its_message() {
    let t = ChatTemplate::compile("{{ raise_exception('roles must alternate') }}").unwrap();
    let e = t
        .render_detailed(&json!([]), false, None, None, &json!({}))
        .unwrap_err();
    assert_eq!(e, RenderError::Raised("roles must alternate".into()));
}

#[test]
fn special_tokens_and_extra() {
    let t = ChatTemplate::compile("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ tools|length }}|{{ add_generation_prompt }}").unwrap();
    assert_eq!(
        t.render(
            &json!([]),
            true,
            None,
            Some("</s>"),
            &json!({"tools": [1, 2]})
        )
        .unwrap(),
        "None|</s>|None|2|True"
    );
    assert_eq!(
        t.render(
            &json!([]),
            false,
            Some("<s>"),
            None,
            &json!({"bos_token": "[B]"})
        )
        .unwrap(),
        "[B]|None|None|0|False"
    );
}

#[test]
fn sandbox_refuses_mutation_and_dunders() {
    assert!(render("{{ [1].append(2) }}", json!([]))
        .unwrap_err()
        .contains("unsafe"));
    assert!(render("{{ messages.__class__ }}", json!([]))
        .unwrap_err()
        .contains("unsafe"));
}

#[test]
fn unsupported_constructs_fail_to_compile() {
    for src in [
        "{% include 'x' %}",
        "{% call f() %}{% endcall %}",
        "{{ x|wibble }}",
        "{% for %}",
        "{% if x %}",
        "{{ x is wobbly }}",
        "{% raw %}{% endraw %}",
    ] {
        assert!(ChatTemplate::compile(src).is_err(), "{}", src);
    }
}

#[test]
fn pathological_templates_fail_cleanly_on_a_small_stack() {
    // tokio's worker threads have 2 MiB stacks: the limits must hold within that.
    let run = || {
        let deep_parens = format!("{{{{ {}1{} }}}}", "(".repeat(60), ")".repeat(60));
        let recursion = "{% macro f(n) %}{{ f(n) ~ (((n))) }}{% endmacro %}{{ f(1) }}".to_string();
        let deep_recursion = format!(
            "{{% macro f(n) %}}{{{{ {}f(n){} }}}}{{% endmacro %}}{{{{ f(1) }}}}",
            "(".repeat(60),
            ")".repeat(60)
        );
        let chain = format!("{{{{ 1{} }}}}", "|abs".repeat(100_000));
        let nested = "{% set ns = namespace(x=1) %}{% for i in range(1000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}".to_string();
        let mut outcomes = Vec::new();
        for src in [deep_parens, recursion, deep_recursion, chain, nested] {
            outcomes.push(
                ChatTemplate::compile(&src)
                    .and_then(|t| t.render(&json!([]), true, None, None, &json!({}))),
            );
        }
        outcomes
    };
    let outcomes = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(run)
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(outcomes[0].as_deref(), Ok("1"));
    for o in &outcomes[1..] {
        assert!(o.is_err(), "{:?}", o);
    }
}

#[test]
fn markup_escapes_what_it_is_added_to() {
    // markupsafe semantics, as in Python even with autoescape off.
    assert_eq!(
        r("{{ 'a'|safe + '<b>' }}|{{ '<b>' + 'a'|safe }}|{{ 'a'|safe ~ '<b>' }}"),
        "a&lt;b&gt;|&lt;b&gt;a|a<b>"
    );
    assert_eq!(
        r("{{ ('<{}>'|safe).format('<&') }}|{{ '<x>'|e }}|{{ ('&'|safe).upper() + '&' }}"),
        "<&lt;&amp;>|&lt;x&gt;|&&amp;"
    );
    assert_eq!(
        r("{{ '{}-{0}-{a}-{{}}'.format(1, a=none) }}"),
        "1-1-None-{}"
    );
}

#[test]
fn unknown_filters_fail_at_compile_time_except_where_jinja_defers_them() {
    assert!(ChatTemplate::compile("{{ x|from_json }}")
        .unwrap_err()
        .contains("no filter named 'from_json'"));
    assert!(
        ChatTemplate::compile("{% for x in y %}{{ x|wordwrap }}{% endfor %}")
            .unwrap_err()
            .contains("not supported")
    );
    assert_eq!(
        r("{% if false %}{{ x|from_json }}{% endif %}{{ 1 if true else x|from_json }}"),
        "1"
    );
    assert!(render("{% if true %}{{ x|from_json }}{% endif %}", json!([])).is_err());
}

/// `cargo test --release -p shoal-template -- --ignored --nocapture render_speed`
#[test]
#[ignore]
fn render_speed() {
    let src = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let t = ChatTemplate::compile(src).unwrap();
    let messages: Vec<_> = (0..10).map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": "hello world ".repeat(20)})).collect();
    let messages = json!(messages);
    let n = 20_000;
    let start = std::time::Instant::now();
    for _ in 0..n {
        t.render(&messages, true, Some("<s>"), Some("</s>"), &json!({}))
            .unwrap();
    }
    println!(
        "render: {:.2} us per 10-message conversation",
        start.elapsed().as_secs_f64() * 1e6 / n as f64
    );
}
