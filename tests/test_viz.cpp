// Trace pictures (viz/trace_plot.hpp): the SVG is well-formed XML (checked by a small parser
// below, which is itself shown to reject malformed input), holds the values' range and one
// tooltip cell per drawn value, names its axes, bins wide traces, and copes with NaN, constant
// data, odd names, 2-D, 4-D routing and undrawable tensors; tick labels replace indices and marked
// cells are outlined; bad input throws attnkit::Error.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "attnkit/viz/trace_plot.hpp"

using namespace attnkit;
using viz::PlotOptions;
using viz::TraceTensor;

namespace {

// ---- a small, strict XML checker --------------------------------------------------------------
// Accepts: an optional <?xml ...?> declaration, comments, elements with quoted, unique attributes,
// text with only the five predefined entities, and exactly one root element, which must be <svg>
// with xmlns="http://www.w3.org/2000/svg". Everything else (CDATA, DOCTYPE, processing
// instructions, numeric references) is rejected: the plotter emits none of it.
struct XmlReport {
  bool ok = false;
  std::string error;
  std::map<std::string, int> elements;   // element name -> count
  int rects_with_title = 0;               // <rect> elements holding a <title>: the heat-map cells
  std::vector<std::string> texts;         // decoded contents of <text> elements
  std::vector<std::string> tooltips;      // decoded contents of <title> elements inside <rect>
  std::vector<std::string> cell_fills;    // fill of each <rect> holding a <title>
  struct Box {
    double x = 0, y = 0, w = 0, h = 0;
    std::string fill, stroke, tip;  // tip: the <title> of a cell, empty for other rects
  };
  std::vector<Box> cells;                 // the <rect>s holding a <title>, in document order
  std::vector<Box> plain_rects;           // every other <rect> (frames, bars, outlines, swatches)
};

XmlReport check_xml(std::string_view s) {
  XmlReport r;
  std::size_t i = 0;
  auto fail = [&](const std::string& why) {
    r.ok = false;
    r.error = why + " at byte " + std::to_string(i);
    return r;
  };
  auto is_ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  auto is_name_start = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
  };
  auto is_name_char = [&](char c) {
    return is_name_start(c) || (c >= '0' && c <= '9') || c == '-' || c == '.';
  };
  auto name = [&]() {
    const std::size_t b = i;
    if (i < s.size() && is_name_start(s[i]))
      while (i < s.size() && is_name_char(s[i])) ++i;
    return std::string(s.substr(b, i - b));
  };
  // Decodes text or an attribute value up to (not including) `end`; false on a bad '&' or '<'.
  auto decode = [&](std::size_t end, std::string& out) {
    static const std::map<std::string, char> entities = {
        {"amp", '&'}, {"lt", '<'}, {"gt", '>'}, {"quot", '"'}, {"apos", '\''}};
    for (std::size_t k = i; k < end; ++k) {
      if (s[k] == '<') return false;
      if (s[k] == '&') {
        const std::size_t semi = s.find(';', k);
        if (semi == std::string_view::npos || semi > end) return false;
        const auto e = entities.find(std::string(s.substr(k + 1, semi - k - 1)));
        if (e == entities.end()) return false;
        out += e->second;
        k = semi;
      } else {
        out += s[k];
      }
    }
    return true;
  };

  if (s.substr(0, 5) == "<?xml") {
    const std::size_t e = s.find("?>");
    if (e == std::string_view::npos) return fail("unterminated XML declaration");
    i = e + 2;
  }
  struct Open {
    std::string name;
    std::string text;
    std::string fill;
    bool has_title = false;
    XmlReport::Box box;
  };
  auto number = [](const std::string& v) { return v.empty() || v.back() == '%' ? 0.0 : std::stod(v); };
  std::vector<Open> stack;
  bool root_seen = false;
  while (i < s.size()) {
    if (s[i] != '<') {  // text
      const std::size_t end = std::min(s.find('<', i), s.size());
      std::string text;
      if (!decode(end, text)) return fail("bad character or entity in text");
      if (stack.empty() && !std::all_of(text.begin(), text.end(), is_ws)) return fail("text outside the root element");
      if (!stack.empty()) stack.back().text += text;
      i = end;
      continue;
    }
    if (s.substr(i, 4) == "<!--") {
      const std::size_t e = s.find("-->", i + 4);
      if (e == std::string_view::npos) return fail("unterminated comment");
      if (s.substr(i + 4, e - i - 4).find("--") != std::string_view::npos) return fail("'--' inside a comment");
      i = e + 3;
      continue;
    }
    if (s.substr(i, 2) == "<!" || s.substr(i, 2) == "<?") return fail("unsupported markup");
    if (s.substr(i, 2) == "</") {  // end tag
      i += 2;
      const std::string n = name();
      while (i < s.size() && is_ws(s[i])) ++i;
      if (i >= s.size() || s[i] != '>') return fail("malformed end tag");
      ++i;
      if (stack.empty() || stack.back().name != n) return fail("end tag </" + n + "> does not match the open element");
      Open closed = std::move(stack.back());
      stack.pop_back();
      if (closed.name == "text") r.texts.push_back(closed.text);
      if (closed.name == "title" && !stack.empty() && stack.back().name == "rect") {
        stack.back().has_title = true;
        stack.back().box.tip = closed.text;
        r.tooltips.push_back(closed.text);
      }
      if (closed.name == "rect" && closed.has_title) {
        ++r.rects_with_title;
        r.cell_fills.push_back(closed.fill);
        r.cells.push_back(closed.box);
      } else if (closed.name == "rect") {
        r.plain_rects.push_back(closed.box);
      }
      continue;
    }
    // start tag
    ++i;
    Open el;
    el.name = name();
    if (el.name.empty()) return fail("malformed start tag");
    if (stack.empty() && root_seen) return fail("a second root element");
    std::set<std::string> attrs;
    std::string xmlns;
    bool self_closing = false;
    for (;;) {
      const std::size_t before = i;
      while (i < s.size() && is_ws(s[i])) ++i;
      if (i >= s.size()) return fail("unterminated start tag");
      if (s[i] == '>') { ++i; break; }
      if (s.substr(i, 2) == "/>") { i += 2; self_closing = true; break; }
      if (i == before) return fail("no space before an attribute");
      const std::string a = name();
      if (a.empty()) return fail("malformed attribute name");
      if (!attrs.insert(a).second) return fail("duplicate attribute " + a);
      while (i < s.size() && is_ws(s[i])) ++i;
      if (i >= s.size() || s[i] != '=') return fail("attribute without '='");
      ++i;
      while (i < s.size() && is_ws(s[i])) ++i;
      if (i >= s.size() || (s[i] != '"' && s[i] != '\'')) return fail("unquoted attribute value");
      const char q = s[i++];
      const std::size_t end = s.find(q, i);
      if (end == std::string_view::npos) return fail("unterminated attribute value");
      std::string value;
      if (!decode(end, value)) return fail("bad character or entity in an attribute value");
      i = end + 1;
      if (a == "xmlns") xmlns = value;
      if (a == "fill") el.fill = el.box.fill = value;
      if (a == "stroke") el.box.stroke = value;
      if (a == "x") el.box.x = number(value);
      if (a == "y") el.box.y = number(value);
      if (a == "width") el.box.w = number(value);
      if (a == "height") el.box.h = number(value);
    }
    if (stack.empty()) {
      if (el.name != "svg") return fail("the root element is <" + el.name + ">, not <svg>");
      if (xmlns != "http://www.w3.org/2000/svg") return fail("the root <svg> lacks xmlns");
      root_seen = true;
    }
    ++r.elements[el.name];
    if (self_closing && el.name == "rect") r.plain_rects.push_back(el.box);
    if (!self_closing) stack.push_back(std::move(el));
  }
  if (!stack.empty()) return fail("unclosed element <" + stack.back().name + ">");
  if (!root_seen) return fail("no root element");
  r.ok = true;
  return r;
}

bool has(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}
bool has_prefix(const std::vector<std::string>& v, const std::string& prefix) {
  return std::any_of(v.begin(), v.end(), [&](const std::string& s) { return s.rfind(prefix, 0) == 0; });
}
bool contains(const std::string& s, const std::string& x) { return s.find(x) != std::string::npos; }

// Gates [L, T, K] with known values: mean over tokens (1 + l*K + k) / 16, each token offset by
// (t - 2) / 64 (T = 5, so the offsets average to 0). All exact in float.
TraceTensor known_gates(std::int64_t L = 3, std::int64_t T = 5, std::int64_t K = 4) {
  TraceTensor g{"gates", {L, T, K}, {}};
  for (std::int64_t l = 0; l < L; ++l)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t k = 0; k < K; ++k)
        g.data.push_back(static_cast<float>((1 + l * K + k) / 16.0 + (t - 2) / 64.0));
  return g;
}

// Routing weights [A, 2, T = 4, K = 2A + 1] as a model records them: row r = 2a + b (sublayer
// 0 = attn, 1 = mlp) reads n_r = r + 2 sources, the last of them its partial (marked); source
// s < n_r has the mean (1 + s) / 8 over tokens, each token offset by (t - 1.5) / 64 (the offsets
// average to 0); entries beyond n_r are 0. All exact in float. described: dims, labels, marks.
constexpr std::int64_t kRoutingTokens = 4;
TraceTensor known_routing(std::int64_t A = 3, bool described = true) {
  const std::int64_t B = 2, T = kRoutingTokens, K = 2 * A + 1;
  TraceTensor w{"routing", {A, B, T, K}, std::vector<float>(static_cast<std::size_t>(A * B * T * K), 0.f)};
  for (std::int64_t r = 0; r < A * B; ++r)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t s = 0; s < r + 2; ++s)
        w.data[static_cast<std::size_t>((r * T + t) * K + s)] = static_cast<float>((1 + s) / 8.0 + (t - 1.5) / 64.0);
  if (!described) return w;
  w.dims = {"layer", "sublayer", "token", "source"};
  std::vector<std::string> cols = {"emb"};
  for (std::int64_t s = 1; s < K; ++s) cols.push_back(std::to_string(s));
  w.labels = {{}, {"attn", "mlp"}, {}, cols};
  for (std::int64_t r = 0; r < A * B; ++r) w.marks.push_back({{r / B, r % B, r + 1}, "partial"});
  return w;
}

// The rects drawn with the outline of marked cells (outlines and legend swatches).
std::vector<XmlReport::Box> red_rects(const XmlReport& r) {
  std::vector<XmlReport::Box> out;
  for (const auto& b : r.plain_rects)
    if (b.stroke == viz::detail::kMarkStroke) out.push_back(b);
  return out;
}
bool inside(const XmlReport::Box& o, const XmlReport::Box& c) {
  return o.x >= c.x - 1e-6 && o.y >= c.y - 1e-6 && o.x + o.w <= c.x + c.w + 1e-6 && o.y + o.h <= c.y + c.h + 1e-6;
}
// How many outlines lie inside the cell whose tooltip is tip (-1: no such cell).
int outlines_in_cell(const XmlReport& r, const std::string& tip) {
  for (const auto& c : r.cells)
    if (c.tip == tip) {
      const auto red = red_rects(r);
      return static_cast<int>(std::count_if(red.begin(), red.end(), [&](auto& o) { return inside(o, c); }));
    }
  return -1;
}

XmlReport checked(const std::string& svg) {
  XmlReport r = check_xml(svg);
  INFO(r.error);
  REQUIRE(r.ok);
  return r;
}

}  // namespace

TEST_CASE("the XML checker accepts well-formed SVG and rejects malformed input", "[viz]") {
  const std::string head = "<svg xmlns=\"http://www.w3.org/2000/svg\">";
  CHECK(check_xml("<?xml version=\"1.0\"?>\n" + head + "<!-- c --><rect x='1' y=\"2\"><title>a &amp; b</title></rect><g/></svg>\n").ok);
  const char* bad[] = {
      "<svg xmlns=\"http://www.w3.org/2000/svg\"><g></svg>",                  // unclosed child
      "<svg xmlns=\"http://www.w3.org/2000/svg\"><a><b></a></b></svg>",        // bad nesting
      "<svg xmlns=http://www.w3.org/2000/svg></svg>",                          // unquoted attribute
      "<svg xmlns=\"http://www.w3.org/2000/svg\"><text>&nbsp;</text></svg>",   // not a predefined entity
      "<svg xmlns=\"http://www.w3.org/2000/svg\"><text>a & b</text></svg>",    // raw '&'
      "<svg xmlns=\"http://www.w3.org/2000/svg\"><g id=\"a<b\"/></svg>",       // '<' in a value
      "<svg xmlns=\"http://www.w3.org/2000/svg\"><g x=\"1\"x=\"2\"/></svg>",   // no space between attributes
      "<svg xmlns=\"http://www.w3.org/2000/svg\"><g x=\"1\" x=\"2\"/></svg>",  // duplicate attribute
      "<svg xmlns=\"http://www.w3.org/2000/svg\"></svg><svg xmlns=\"http://www.w3.org/2000/svg\"></svg>",  // two roots
      "<svg></svg>",                                                           // no xmlns
      "<g xmlns=\"http://www.w3.org/2000/svg\"></g>",                          // root not <svg>
      "<svg xmlns=\"http://www.w3.org/2000/svg\">",                            // root never closed
      "text <svg xmlns=\"http://www.w3.org/2000/svg\"></svg>",                 // text outside the root
      "",                                                                      // nothing
  };
  for (const char* b : bad) {
    INFO(b);
    CHECK_FALSE(check_xml(b).ok);
  }
}

TEST_CASE("3-D gates: layer x head means and a token x head strip, on a [0, 1] scale", "[viz]") {
  const TraceTensor g = known_gates();  // L = 3, T = 5, K = 4
  const std::string svg = viz::plot_trace_svg({g});
  const XmlReport r = checked(svg);

  CHECK(r.rects_with_title == 3 * 4 + 5 * 4);  // layer x head, then token x head of one layer
  CHECK(has(r.texts, "gates: mean over 5 tokens"));
  CHECK(has(r.texts, "gates, layer 2: per token"));  // default: the last layer
  for (const char* axis : {"layer", "head", "token"}) CHECK(has(r.texts, axis));
  CHECK(has(r.texts, "attnkit trace"));

  // Values in [0, 1]: the bar runs 0..1 and the caption gives the drawn range of each panel.
  CHECK(has(r.texts, "0"));
  CHECK(has(r.texts, "1"));
  CHECK(has_prefix(r.texts, "colour scale fixed to [0, 1] (every finite value lies in [0, 1]); drawn values from 0.0625 to 0.75"));
  CHECK(has_prefix(r.texts, "colour scale fixed to [0, 1] (every finite value lies in [0, 1]); drawn values from 0.531 to 0.781"));
  CHECK(r.elements.at("polygon") == 4);  // drawn min / max markers on both bars

  // Tooltips: indices in tensor order and the value at three significant digits.
  CHECK(has(r.tooltips, "layer 1, head 3: 0.5"));        // (1 + 4 + 3) / 16
  CHECK(has(r.tooltips, "layer 0, head 0: 0.0625"));
  CHECK(has(r.tooltips, "token 0, head 0: 0.531"));      // layer 2: 9/16 - 2/64
  CHECK(has(r.tooltips, "token 4, head 3: 0.781"));      // 12/16 + 2/64
  // The smallest mean is the darkest viridis colour, the largest of 0.75 is not the brightest.
  CHECK(r.cell_fills.front() == viz::detail::viridis(0.0625));
  CHECK(std::count(r.cell_fills.begin(), r.cell_fills.end(), "#fde725") == 0);

  PlotOptions o;
  o.strip_layer = 1;
  o.title = "run 7";
  const XmlReport r1 = checked(viz::plot_trace_svg({g}, o));
  CHECK(has(r1.texts, "gates, layer 1: per token"));
  CHECK(has(r1.tooltips, "token 0, head 0: 0.281"));  // 5/16 - 2/64
  CHECK(has(r1.texts, "run 7"));
}

TEST_CASE("2-D tensors: rows x tokens on the data's own scale; axis names from dims", "[viz]") {
  TraceTensor e{"exit_gate", {2, 3}, {-2.f, 0.f, 1.f, 2.f, 3.f, 3.5f}};
  XmlReport r = checked(viz::plot_trace_svg({e}));
  CHECK(r.rects_with_title == 6);
  CHECK(has(r.texts, "exit_gate: per row and token"));
  CHECK(has(r.texts, "row"));
  CHECK(has(r.texts, "token"));
  CHECK(has(r.texts, "-2"));   // colour-bar ends: the data min and max
  CHECK(has(r.texts, "3.5"));
  CHECK(has(r.texts, "colour scale from the drawn min -2 to the drawn max 3.5"));
  CHECK(has(r.tooltips, "row 1, token 2: 3.5"));
  CHECK(r.cell_fills.front() == "#440154");  // min -> first stop
  CHECK(r.cell_fills.back() == "#fde725");   // max -> last stop

  e.dims = {"step", "token"};
  r = checked(viz::plot_trace_svg({e}));
  CHECK(has(r.texts, "exit_gate: per step and token"));
  CHECK(has(r.texts, "step"));
  CHECK(has(r.tooltips, "step 0, token 1: 0"));

  TraceTensor w{"attnres", {2, 3, 2}, std::vector<float>(12, 0.5f), {"layer", "token", "source"}};
  r = checked(viz::plot_trace_svg({w}));
  CHECK(has(r.texts, "source"));
  CHECK(has(r.tooltips, "layer 1, source 1: 0.5"));
}

TEST_CASE("4-D routing weights: (layer, sublayer) rows x sources, mean over tokens, labelled", "[viz]") {
  const std::int64_t A = 3, R = 6, K = 7, T = kRoutingTokens;
  const TraceTensor w = known_routing(A);
  const XmlReport r = checked(viz::plot_trace_svg({w}));

  // (a) A·B rows x K sources, then (b) a token x source strip of one row.
  CHECK(r.rects_with_title == R * K + T * K);
  CHECK(has(r.texts, "routing: mean over 4 tokens"));
  CHECK(has(r.texts, "layer \xc2\xb7 sublayer"));  // the folded axis
  CHECK(has(r.texts, "source"));
  CHECK(has(r.texts, "shape [3, 2, 4, 7] = (layer, sublayer, token, source)"));
  for (const char* row : {"0 attn", "0 mlp", "1 attn", "1 mlp", "2 attn", "2 mlp"}) CHECK(has(r.texts, row));
  CHECK(has(r.texts, "emb"));  // column 0's label instead of "0"

  // Rows down, sources across, in tensor order: the cell of row r, source s is the mean (1 + s) / 8
  // for the sources that row reads, 0 beyond.
  REQUIRE(r.cells.size() == static_cast<std::size_t>(R * K + T * K));
  const char* subl[] = {"attn", "mlp"};
  for (std::int64_t row = 0; row < R; ++row)
    for (std::int64_t s = 0; s < K; ++s) {
      const auto& c = r.cells[static_cast<std::size_t>(row * K + s)];
      const double mean = s < row + 2 ? (1 + s) / 8.0 : 0.0;
      INFO("row " << row << ", source " << s << ": " << c.tip);
      CHECK(c.fill == viz::detail::viridis(mean));
      const std::string src = s == 0 ? "emb" : std::to_string(s);
      const std::string tip = "layer " + std::to_string(row / 2) + " " + subl[row % 2] + ", source " + src + ": " +
                              viz::detail::fmt_value(mean) + (s == row + 1 ? " (partial)" : "");
      CHECK(c.tip == tip);
      if (s > 0) CHECK(c.x > r.cells[static_cast<std::size_t>(row * K + s - 1)].x);  // sources across
      if (row > 0) CHECK(c.y > r.cells[static_cast<std::size_t>((row - 1) * K + s)].y);  // rows down
    }
  CHECK(has(r.tooltips, "layer 0 attn, source emb: 0.125"));
  CHECK(has(r.tooltips, "layer 1 mlp, source 4: 0.625 (partial)"));
  CHECK(has(r.tooltips, "layer 1 mlp, source 5: 0"));
  CHECK(has_prefix(r.texts, "colour scale fixed to [0, 1] (every finite value lies in [0, 1]); drawn values from 0 to 0.875"));

  // Every partial is outlined in the map, and only the partials: 6 cells, plus the strip's
  // partial row and one legend swatch per panel.
  for (std::int64_t row = 0; row < R; ++row) {
    const std::string tip = "layer " + std::to_string(row / 2) + " " + subl[row % 2] + ", source " +
                            std::to_string(row + 1) + ": " + viz::detail::fmt_value((row + 2) / 8.0) + " (partial)";
    INFO(tip);
    CHECK(outlines_in_cell(r, tip) == 1);
  }
  CHECK(outlines_in_cell(r, "layer 0 attn, source emb: 0.125") == 0);
  CHECK(red_rects(r).size() == 6 + 1 + 2);
  CHECK(std::count(r.texts.begin(), r.texts.end(), "outlined: partial") == 2);

  // (b) the default strip: the last row holding a finite value, its partial (source 6) outlined
  // along all tokens.
  CHECK(has(r.texts, "routing, layer 2 mlp: per token"));
  CHECK(has(r.tooltips, "token 0, source emb: 0.102"));            // 1/8 - 1.5/64
  CHECK(has(r.tooltips, "token 3, source 6: 0.898 (partial)"));    // 7/8 + 1.5/64
  const auto red = red_rects(r);
  const auto band = std::find_if(red.begin(), red.end(), [&](auto& o) { return o.w > 3 * o.h; });
  REQUIRE(band != red.end());
  int covered = 0;
  for (std::size_t i = static_cast<std::size_t>(R * K); i < r.cells.size(); ++i) {
    const auto& c = r.cells[i];
    const bool partial = c.tip.rfind("(partial)") != std::string::npos;
    const bool in_band = c.y <= band->y && c.y + c.h >= band->y + band->h && c.x < band->x + band->w && c.x + c.w > band->x;
    CHECK(partial == in_band);
    covered += in_band;
  }
  CHECK(covered == T);

  PlotOptions o;
  o.strip_layer = 1;  // the last row of layer 1
  const XmlReport r1 = checked(viz::plot_trace_svg({w}, o));
  CHECK(has(r1.texts, "routing, layer 1 mlp: per token"));
  CHECK(has(r1.tooltips, "token 0, source 4: 0.602 (partial)"));  // 5/8 - 1.5/64

  // Without dims, labels and marks: indices, the default axis names, no outlines.
  const XmlReport rb = checked(viz::plot_trace_svg({known_routing(A, false)}));
  CHECK(rb.rects_with_title == R * K + T * K);
  CHECK(has(rb.texts, "layer \xc2\xb7 sublayer"));
  CHECK(has(rb.texts, "1\xc2\xb7" "0"));
  CHECK(has(rb.tooltips, "layer 1, sublayer 0, source 3: 0.5"));
  CHECK(has(rb.texts, "routing, layer 2, sublayer 1: per token"));
  CHECK(red_rects(rb).empty());
  CHECK_FALSE(has_prefix(rb.texts, "outlined"));
}

TEST_CASE("4-D routing weights: non-finite values are grey and counted, empty rows named", "[viz]") {
  TraceTensor w = known_routing(3);
  const std::int64_t T = kRoutingTokens, K = 7;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  w.data[static_cast<std::size_t>((1 * T + 2) * K + 0)] = nan;  // layer 0 mlp, token 2, emb
  w.data[static_cast<std::size_t>((2 * T + 0) * K + 1)] = inf;  // layer 1 attn, token 0, source 1
  std::fill(w.data.begin() + 4 * T * K, w.data.end(), nan);    // layer 2: no mechanism
  const XmlReport r = checked(viz::plot_trace_svg({w}));
  CHECK(has(r.tooltips, "layer 0 mlp, source emb: not finite (1 of 4 values NaN or inf)"));
  CHECK(has(r.tooltips, "layer 1 attn, source 1: not finite (1 of 4 values NaN or inf)"));
  CHECK(has(r.tooltips, "layer 2 mlp, source 6: not finite (4 of 4 values NaN or inf) (partial)"));
  CHECK(has(r.texts, "no finite value in rows 2 attn, 2 mlp"));
  CHECK(has(r.texts, "grey: 16 non-finite cells (57 NaN, 1 inf among the 168 values)"));
  // The default strip skips the empty rows.
  CHECK(has(r.texts, "routing, layer 1 mlp: per token"));
  CHECK(has(r.texts, "colour scale fixed to [0, 1] (every finite value lies in [0, 1]); drawn values from 0 to 0.625"));

  PlotOptions o;
  o.strip_layer = 2;  // asked for: its last row, all grey
  const XmlReport r2 = checked(viz::plot_trace_svg({w}, o));
  CHECK(has(r2.texts, "routing, layer 2 mlp: per token"));
  CHECK(has(r2.texts, "no finite values: every cell is grey"));
  o.strip_layer = 0;
  const XmlReport r0 = checked(viz::plot_trace_svg({w}, o));
  CHECK(has(r0.texts, "routing, layer 0 mlp: per token"));
  CHECK(has(r0.tooltips, "token 2, source emb: NaN"));
  CHECK(has(r0.texts, "grey: 1 non-finite cell (1 NaN among the 28 values)"));
}

TEST_CASE("3-D and 2-D tensors: tick labels replace indices, marks are outlined", "[viz]") {
  // Empty label lists mean indices: the same picture as without labels.
  TraceTensor g = known_gates();  // L = 3, T = 5, K = 4
  g.labels = {{}, {}, {}};
  CHECK(viz::plot_trace_svg({g}) == viz::plot_trace_svg({known_gates()}));

  g.labels = {{"L0", "L1", "L2"}, {}, {"q", "k", "v", "o"}};
  g.marks = {{{1, 3}, "max"}, {{2, 0}, "min"}};
  XmlReport r = checked(viz::plot_trace_svg({g}));
  CHECK(r.rects_with_title == 3 * 4 + 5 * 4);
  for (const char* l : {"L0", "L2", "q", "k", "v", "o"}) {  // L1: layer ticks skip one to fit "L0"
    INFO(l);
    CHECK(has(r.texts, l));
  }
  CHECK(has(r.tooltips, "layer L1, head o: 0.5 (max)"));
  CHECK(has(r.tooltips, "layer L0, head q: 0.0625"));
  CHECK(outlines_in_cell(r, "layer L1, head o: 0.5 (max)") == 1);
  CHECK(outlines_in_cell(r, "layer L2, head q: 0.562 (min)") == 1);  // 9/16
  CHECK(outlines_in_cell(r, "layer L0, head q: 0.0625") == 0);
  CHECK(has(r.texts, "outlined: max"));
  CHECK(std::count(r.texts.begin(), r.texts.end(), "outlined: min") == 2);  // the map and the strip of L2
  CHECK(has(r.texts, "gates, layer L2: per token"));
  CHECK(has(r.tooltips, "token 4, head q: 0.594 (min)"));  // 9/16 + 2/64
  CHECK(has(r.tooltips, "token 4, head o: 0.781"));
  CHECK(red_rects(r).size() == 2 + 1 + 3);  // two cells, L2's band, swatches: max and min, min

  // 2-D: labels on both axes; a mark {row} outlines the row along all its tokens.
  TraceTensor e{"exit_gate", {2, 3}, {-2.f, 0.f, 1.f, 2.f, 3.f, 3.5f}, {"step", "token"}};
  e.labels = {{"a", "b"}, {"x", "y", "z"}};
  e.marks = {{{1}, "exit"}};
  r = checked(viz::plot_trace_svg({e}));
  CHECK(has(r.tooltips, "step b, token z: 3.5 (exit)"));
  CHECK(has(r.tooltips, "step b, token x: 2 (exit)"));
  CHECK(has(r.tooltips, "step a, token x: -2"));
  for (const char* l : {"a", "b", "x", "z", "outlined: exit"}) {  // y: token ticks skip one to fit
    INFO(l);
    CHECK(has(r.texts, l));
  }
  const auto red = red_rects(r);
  REQUIRE(red.size() == 2);  // the row and the swatch
  int in_band = 0;
  for (const auto& c : r.cells) in_band += inside(red[0], XmlReport::Box{c.x - 100, c.y, c.w + 200, c.h, "", "", ""});
  CHECK(in_band == 3);  // one row high, three tokens wide
  CHECK(red[0].w > 2 * r.cells[0].w);
}

TEST_CASE("bad labels and marks throw attnkit::Error naming the tensor and the problem", "[viz]") {
  using Catch::Matchers::Contains;
  TraceTensor w = known_routing(3);
  w.labels = {{}, {"attn", "mlp"}, {}};
  CHECK_THROWS_WITH(viz::plot_trace_svg({w}),
                    Contains("plot_trace_svg: trace[0] 'routing': labels has 3 lists for a shape of rank 4"));
  w = known_routing(3);
  w.labels[1] = {"attn"};
  CHECK_THROWS_WITH(viz::plot_trace_svg({w}),
                    Contains("plot_trace_svg: trace[0] 'routing': labels[1] has 1 labels for dimension 1 (sublayer) of extent 2"));
  w = known_routing(3);
  w.labels[3].push_back("extra");
  CHECK_THROWS_WITH(viz::plot_trace_svg({w}), Contains("labels[3] has 8 labels for dimension 3 (source) of extent 7"));

  w = known_routing(3);
  w.marks.push_back({{0, 1}, "partial"});
  CHECK_THROWS_WITH(viz::plot_trace_svg({w}),
                    Contains("plot_trace_svg: trace[0] 'routing': marks[6] index {0, 1} has 2 entries, needs 3 (one per "
                             "dimension except the token axis, dimension 2)"));
  w.marks.back() = {{0, 2, 1}, "partial"};
  CHECK_THROWS_WITH(viz::plot_trace_svg({w}),
                    Contains("marks[6] index {0, 2, 1}: 2 is out of range for dimension 1 (sublayer) of extent 2"));
  w.marks.back() = {{0, 1, 7}, "partial"};
  CHECK_THROWS_WITH(viz::plot_trace_svg({w}), Contains("marks[6] index {0, 1, 7}: 7 is out of range for dimension 3 (source) of extent 7"));
  w.marks.back() = {{-1, 0, 0}, "partial"};
  CHECK_THROWS_WITH(viz::plot_trace_svg({w}), Contains("marks[6] index {-1, 0, 0}: -1 is out of range for dimension 0 (layer) of extent 3"));
  CHECK_THROWS_WITH(viz::write_trace_svg("/nonexistent-attnkit-dir/trace.svg", {w}),
                    Contains("write_trace_svg: trace[0] 'routing': marks[6]"));

  TraceTensor g = known_gates();
  g.marks = {{{0, 0, 0}, "x"}};
  CHECK_THROWS_WITH(viz::plot_trace_svg({g}), Contains("'gates': marks[0] index {0, 0, 0} has 3 entries, needs 2 (one per dimension except the token axis, dimension 1)"));
  g.marks = {{{0, 4}, "x"}};
  CHECK_THROWS_WITH(viz::plot_trace_svg({g}), Contains("'gates': marks[0] index {0, 4}: 4 is out of range for dimension 2 of extent 4"));
  g.marks = {};
  g.labels = {{"a", "b"}, {}, {}};
  CHECK_THROWS_WITH(viz::plot_trace_svg({g}), Contains("'gates': labels[0] has 2 labels for dimension 0 of extent 3"));

  TraceTensor e{"e", {2, 3}, std::vector<float>(6)};
  e.marks = {{{0, 1}, "x"}};
  CHECK_THROWS_WITH(viz::plot_trace_svg({e}), Contains("'e': marks[0] index {0, 1} has 2 entries, needs 1 (one per dimension except the token axis, dimension 1)"));
  e.marks = {{{2}, "x"}};
  CHECK_THROWS_WITH(viz::plot_trace_svg({e}), Contains("'e': marks[0] index {2}: 2 is out of range for dimension 0 of extent 2"));

  PlotOptions o;
  o.strip_layer = 3;
  CHECK_THROWS_WITH(viz::plot_trace_svg({known_routing(3)}, o),
                    Contains("plot_trace_svg: opt.strip_layer: layer 3 is out of range for trace[0] 'routing' with 3 layers"));
  CHECK_THROWS_AS(viz::plot_trace_svg({w}), attnkit::Error);
}

TEST_CASE("traces wider than max_tokens are averaged into bins and the picture says so", "[viz]") {
  const std::int64_t L = 2, T = 1000, K = 3;
  TraceTensor g{"gates", {L, T, K}, {}};
  for (std::int64_t l = 0; l < L; ++l)
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t k = 0; k < K; ++k) g.data.push_back(static_cast<float>(2 * t));
  PlotOptions o;
  o.max_tokens = 64;  // bins of ceil(1000 / 64) = 16 tokens -> 63 columns, the last of 8
  const XmlReport r = checked(viz::plot_trace_svg({g}, o));
  CHECK(r.rects_with_title == L * K + 63 * K);
  CHECK(has(r.texts, "gates, layer 1: per token (means over bins of 16 tokens)"));
  CHECK(has(r.texts, "1000 tokens > max_tokens = 64: each column is the mean of 16 tokens (the last of 8)"));
  CHECK(has(r.tooltips, "tokens 0-15, head 0: 15"));        // mean of 2 * (0..15)
  CHECK(has(r.tooltips, "tokens 992-999, head 2: 1991"));   // mean of 2 * (992..999)
  CHECK(has(r.texts, "gates: mean over 1000 tokens"));

  // The default bound keeps a long trace small: 4 layers x 16 heads x 5000 tokens.
  TraceTensor big{"gates", {4, 5000, 16}, std::vector<float>(4 * 5000 * 16, 0.25f)};
  const std::string svg = viz::plot_trace_svg({big});
  const XmlReport rb = checked(svg);
  CHECK(rb.rects_with_title == 4 * 16 + 500 * 16);  // bins of 10 tokens
  CHECK(svg.size() < 1'500'000);
}

TEST_CASE("NaN and inf are grey and counted; constant data are said to be constant", "[viz]") {
  TraceTensor g = known_gates();
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  g.data[(2 * 5 + 1) * 4 + 0] = nan;  // layer 2, token 1, head 0
  g.data[(2 * 5 + 3) * 4 + 1] = inf;  // layer 2, token 3, head 1
  const std::string svg = viz::plot_trace_svg({g});
  const XmlReport r = checked(svg);
  CHECK(r.rects_with_title == 3 * 4 + 5 * 4);
  CHECK(has(r.tooltips, "layer 2, head 0: not finite (1 of 5 values NaN or inf)"));
  CHECK(has(r.tooltips, "token 1, head 0: NaN"));
  CHECK(has(r.tooltips, "token 3, head 1: inf"));
  CHECK(std::count(r.cell_fills.begin(), r.cell_fills.end(), viz::detail::kNonFiniteFill) == 2 + 2);
  CHECK(has(r.texts, "grey: 2 non-finite cells (1 NaN, 1 inf among the 60 values)"));
  CHECK(has(r.texts, "grey: 2 non-finite cells (1 NaN, 1 inf among the 20 values)"));
  // The other values still lie in [0, 1], so the fixed scale stays; no NaN leaks into numbers.
  CHECK(has_prefix(r.texts, "colour scale fixed to [0, 1]"));
  CHECK_FALSE(contains(svg, "nan"));
  CHECK_FALSE(contains(svg, "=\"inf"));

  // A model trace fills layers without the mechanism with NaN: they are named, and the default
  // strip is the last layer that holds a value.
  TraceTensor hybrid = known_gates(4);
  for (std::int64_t l : {1, 3})
    std::fill(hybrid.data.begin() + l * 20, hybrid.data.begin() + (l + 1) * 20, nan);
  XmlReport rh = checked(viz::plot_trace_svg({hybrid}));
  CHECK(has(rh.texts, "no finite value in layers 1, 3"));
  CHECK(has(rh.texts, "gates, layer 2: per token"));
  CHECK(has(rh.texts, "grey: 8 non-finite cells (40 NaN among the 80 values)"));
  PlotOptions last;
  last.strip_layer = 3;  // asked for explicitly: drawn, all grey
  rh = checked(viz::plot_trace_svg({hybrid}, last));
  CHECK(has(rh.texts, "gates, layer 3: per token"));
  CHECK(has(rh.texts, "no finite values: every cell is grey"));

  TraceTensor all_nan{"broken", {2, 3}, std::vector<float>(6, nan)};
  const XmlReport rn = checked(viz::plot_trace_svg({all_nan}));
  CHECK(has(rn.texts, "no finite values: every cell is grey"));
  CHECK(std::count(rn.cell_fills.begin(), rn.cell_fills.end(), viz::detail::kNonFiniteFill) == 6);

  TraceTensor c{"bias", {2, 4}, std::vector<float>(8, 2.5f)};
  const std::string sc = viz::plot_trace_svg({c});
  const XmlReport rc = checked(sc);
  CHECK(has(rc.texts, "constant: every drawn value is 2.5"));
  CHECK(has(rc.texts, "2.5"));  // the bar's single label
  REQUIRE(rc.cell_fills.size() == 8);
  CHECK(std::all_of(rc.cell_fills.begin(), rc.cell_fills.end(), [&](auto& f) { return f == rc.cell_fills[0]; }));
  CHECK_FALSE(contains(sc, "nan"));
  CHECK_FALSE(contains(sc, "inf"));
}

TEST_CASE("names and titles are XML-escaped; odd bytes cannot break the file", "[viz]") {
  TraceTensor t{"a<b&\"c\"", {2, 2}, {0.f, 0.25f, 0.5f, 1.f}};
  PlotOptions o;
  o.title = "x & y <z> 'q'";
  const std::string svg = viz::plot_trace_svg({t}, o);
  const XmlReport r = checked(svg);
  CHECK(contains(svg, "a&lt;b&amp;&quot;c&quot;"));
  CHECK(has(r.texts, "a<b&\"c\": per row and token"));
  CHECK(has(r.texts, "x & y <z> 'q'"));

  // Control characters and invalid UTF-8 become '?'; valid UTF-8 passes through.
  TraceTensor u{std::string("\xce\xbb-gate\x01\xff\xc3"), {1, 2}, {0.f, 1.f}};
  const XmlReport ru = checked(viz::plot_trace_svg({u}));
  CHECK(has(ru.texts, "\xce\xbb-gate???: per row and token"));
}

TEST_CASE("tensors of other ranks or without values are noted, not drawn", "[viz]") {
  const std::vector<TraceTensor> trace = {
      {"loss", {5}, std::vector<float>(5, 1.f)},
      {"scalar", {}, {3.f}},
      {"x5", {1, 1, 2, 2, 1}, std::vector<float>(4, 0.f)},
      {"empty4", {2, 2, 0, 3}, {}},
      {"empty", {2, 0, 3}, {}},
      known_gates(),
  };
  const XmlReport r = checked(viz::plot_trace_svg(trace));
  CHECK(has(r.texts, "loss [5]: not drawn (only 2-D [row, token], 3-D [layer, token, K] and 4-D [layer, sublayer, "
                     "token, K] tensors are drawn)"));
  CHECK(has_prefix(r.texts, "scalar []: not drawn"));
  CHECK(has_prefix(r.texts, "x5 [1, 1, 2, 2, 1]: not drawn"));
  CHECK(has(r.texts, "empty [2, 0, 3]: not drawn (it has no values)"));
  CHECK(has(r.texts, "empty4 [2, 2, 0, 3]: not drawn (it has no values)"));
  CHECK(r.rects_with_title == 3 * 4 + 5 * 4);  // only the gates
}

TEST_CASE("bad traces and options throw attnkit::Error naming function, argument and problem", "[viz]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(viz::plot_trace_svg({}), Contains("plot_trace_svg: trace: is empty"));
  CHECK_THROWS_WITH(viz::plot_trace_svg({{"g", {2, 3, 4}, std::vector<float>(23)}}),
                    Contains("plot_trace_svg: trace[0] 'g': shape [2, 3, 4] holds 24 values but data has 23"));
  CHECK_THROWS_WITH(viz::plot_trace_svg({known_gates(), {"h", {-1, 2}, {}}}),
                    Contains("plot_trace_svg: trace[1] 'h': shape [-1, 2] has a negative dimension"));
  CHECK_THROWS_WITH(viz::plot_trace_svg({{"h", {1 << 30, 1 << 30, 1 << 30}, {}}}),
                    Contains("holds too many values but data has 0"));
  CHECK_THROWS_WITH(viz::plot_trace_svg({{"h", {2, 2}, std::vector<float>(4), {"step"}}}),
                    Contains("plot_trace_svg: trace[0] 'h': dims has 1 names for a shape of rank 2"));
  PlotOptions o;
  o.strip_layer = 3;
  CHECK_THROWS_WITH(viz::plot_trace_svg({known_gates()}, o),
                    Contains("plot_trace_svg: opt.strip_layer: layer 3 is out of range for trace[0] 'gates' with 3 layers"));
  o.strip_layer = -2;
  CHECK_THROWS_WITH(viz::plot_trace_svg({known_gates()}, o), Contains("plot_trace_svg: opt.strip_layer: must be -1"));
  o = {};
  o.max_tokens = 0;
  CHECK_THROWS_WITH(viz::plot_trace_svg({known_gates()}, o), Contains("plot_trace_svg: opt.max_tokens: must be at least 1"));
  CHECK_THROWS_AS(viz::plot_trace_svg({}), attnkit::Error);

  CHECK_THROWS_WITH(viz::write_trace_svg("/nonexistent-attnkit-dir/trace.svg", {known_gates()}),
                    Contains("write_trace_svg: file: cannot open '/nonexistent-attnkit-dir/trace.svg' for writing"));
  CHECK_THROWS_WITH(viz::write_trace_svg("/nonexistent-attnkit-dir/trace.svg", {}),
                    Contains("write_trace_svg: trace: is empty"));
}

TEST_CASE("write_trace_svg writes exactly plot_trace_svg's document", "[viz]") {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("attnkit-test-viz-" + std::to_string(std::random_device{}()));
  fs::create_directories(dir);
  struct Cleanup {
    fs::path p;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  } cleanup{dir};
  const std::vector<TraceTensor> trace = {known_gates(), {"exit_gate", {2, 5}, std::vector<float>(10, 0.1f)}};
  viz::write_trace_svg(dir / "trace.svg", trace);
  std::ifstream in(dir / "trace.svg", std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  CHECK(ss.str() == viz::plot_trace_svg(trace));
  checked(ss.str());
}
