// attnkit/viz/trace_plot.hpp — pictures of a mechanism's internals: a trace drawn as one SVG.
//
// A trace is a list of named float32 tensors that a model run recorded (Loop Attention's gates
// [layers, T, heads], Attention Residuals' routing weights [layers, 2, T, sources], an exit
// probability [steps, T], ...). plot_trace_svg turns it into one self-contained SVG (no scripts,
// no external files, no dependencies) that a researcher reads at a glance in a browser:
//
//  * 3-D [layer, token, K]: (a) a layer × K heat map of the mean over tokens (layers across, K
//    down) — which layers and heads use the mechanism at all — and (b) a token × K strip of one
//    layer (opt.strip_layer, default the last layer holding a finite value) — where in the
//    sequence it acts.
//  * 4-D [layer, sublayer, token, K] (routing: which source each call reads): the 3-D pictures of
//    the tensor with its layer × sublayer rows folded into one axis of A·B rows (a 4-D tensor is
//    a 3-D one with A·B rows), except that the mean map puts those rows down and K across, the
//    usual orientation of a routing matrix: row "3 mlp" is the call of layer 3 before its MLP.
//    Its axis title is "layer · sublayer"; tooltips read "layer 3 mlp, source emb: 0.734" (with
//    sublayer indices instead of labels: tick "3·1", tooltip "layer 3, sublayer 1, source 0:
//    0.734"). Rows with no finite value are listed ("no finite value in rows 2 attn, 2 mlp"),
//    and row ticks skip whole layers when rows are too thin to label each. The strip
//    shows one row: the last row holding a finite value, or with opt.strip_layer = l the last
//    row of layer l holding one (the last row of l if none does).
//  * 2-D [row, token]: one heat map, rows × tokens.
//  * A selection, 3-D [layer, token, K] of key positions each query kept (sparse attention's
//    "topk_indices", or any tensor whose last dimension is named "selected key"; -1 = padding):
//    one query × key map of one layer (opt.strip_layer, default the last layer holding a
//    selection), cell (t, s) = 1 when query t kept key s, else 0 (binned: the share kept).
//  * Any other rank, or a tensor with no values: a line of text saying it is not drawn.
//
// Every panel has a title naming the tensor and what is shown, axes with ticks and titles, and a
// vertical colour bar whose ends are written as numbers. Colours: one perceptual map (viridis,
// linear between its 9 standard stops), so equal steps in value look like equal steps in colour
// and the picture survives grey-scale printing. When every finite value of a tensor lies in
// [0, 1] (gates, probabilities, softmax weights) the scale is fixed to [0, 1], so that 0.5 looks
// the same in every picture; small markers on the bar and the caption give the drawn min / max.
// Otherwise the scale spans the panel's drawn min..max; constant data are drawn in the middle
// colour and said to be constant. Non-finite values (NaN, ±inf) are drawn grey and counted in the
// caption; a mean over any non-finite value is non-finite (a NaN in a trace is a bug, or a layer
// without the mechanism, which model traces fill with NaN: either way it should show, not be
// averaged away). Layers (4-D: rows) with no finite value at all are listed under the mean map.
//
// Each cell carries a <title> tooltip with its indices and value ("layer 1, head 3: 0.734", three
// significant digits). Indices are 0-based, as in the tensor and opt.strip_layer. When a tensor
// has more than opt.max_tokens tokens, tokens are averaged into equal bins (at most max_tokens
// columns) and the title and caption say so; this bounds the file size (about 110 bytes a cell).
// Axis titles and tooltips use TraceTensor::dims when given ("source", "step"), else "layer",
// "token", "head" (3-D); "layer", "sublayer", "token", "source" (4-D); "row", "token" (2-D).
// Names and titles are XML-escaped; control characters and invalid UTF-8 become '?'.
//
// Tick labels: TraceTensor::labels, when given, holds one list per dimension, each either empty
// (ticks and tooltips show indices) or one label per index ({"attn", "mlp"}; {"emb", "1", ...}).
// Labels replace the index on the ticks and in tooltips ("layer 3 mlp, source emb"); binned token
// tooltips keep index ranges. Tick spacing makes room for the widest label of an axis.
//
// Marks: each TraceMark points out one cell by its index along every dimension except the token
// axis — the next-to-last dimension (3-D: {layer, k}; 4-D: {layer, sublayer, k}), the last one of
// a 2-D [row, token] ({row}) — with a short label ("partial": the source that is the current
// residual stream). In a mean map a marked cell gets a red outline; in a token strip (and a 2-D
// map) the marked row gets one along all its tokens. Marked cells' tooltips end in the label
// ("layer 3 mlp, source 7: 0.25 (partial)"), and each panel with outlines has a legend line per
// label ("outlined: partial").
//
// Errors (empty trace, shape / data size mismatch, labels of the wrong count for a dimension, a
// mark index of the wrong rank or out of range, bad options, unwritable file) throw
// attnkit::Error with a message "<function>: <argument>: <problem>".
#pragma once

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "attnkit/core/error.hpp"
#include "attnkit/core/trace_tensor.hpp"

namespace attnkit::viz {

// The tensor type shared with model traces (core/trace_tensor.hpp). dims: axis names used in
// axis titles and tooltips; labels: tick labels; marks: cells to outline (see above).
using attnkit::TraceTensor;
using attnkit::TraceMark;

struct PlotOptions {
  // Layer for the token × K strip; -1 -> the last layer that holds a finite value (the last layer
  // if none does): model traces fill layers without the mechanism with NaN, and a default strip
  // of nothing but grey would show nothing. 4-D: the strip shows one (layer, sublayer) row, the
  // last one holding a finite value (of this layer, if one is given).
  std::int64_t strip_layer = -1;
  std::string title;              // heading of the picture; empty -> "attnkit trace"
  int max_tokens = 512;           // wider traces are averaged into bins (said in the caption)
};

namespace detail {

inline constexpr double kCharWidth = 6.5;  // rough advance of an 11 px sans-serif glyph (layout only)
inline constexpr const char* kNonFiniteFill = "#c8c8c8";  // light grey: not on the viridis ramp
// Outline of marked cells: red, far in hue from every viridis colour and of middling lightness,
// so it shows on dark purple and on bright yellow alike.
inline constexpr const char* kMarkStroke = "#ff2a2a";

// Appends s escaped for XML text. Names come from user files, so control characters (not allowed
// in XML 1.0) and invalid UTF-8 (which would make the whole file unreadable) become '?'.
inline void append_xml(std::string& out, std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&quot;"; break;
        case '\'': out += "&apos;"; break;
        case '\t': case '\n': case '\r': out += ' '; break;
        default: out += c < 0x20 ? '?' : static_cast<char>(c);
      }
      ++i;
      continue;
    }
    // A multi-byte UTF-8 sequence: the lead byte gives its length and the range of the second
    // byte (which excludes overlong forms, surrogates and code points above U+10FFFF).
    std::size_t len = 0;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    bool ok = len != 0 && i + len <= s.size();
    for (std::size_t k = 1; ok && k < len; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    }
    if (ok && len == 3 && c == 0xEF && static_cast<unsigned char>(s[i + 1]) == 0xBF &&
        static_cast<unsigned char>(s[i + 2]) >= 0xBE)
      ok = false;  // U+FFFE, U+FFFF are not XML characters
    if (ok) out.append(s.substr(i, len)), i += len;
    else out += '?', ++i;
  }
}

inline std::string xml(std::string_view s) {
  std::string out;
  append_xml(out, s);
  return out;
}

// A value for a human: three significant digits ("0.734", "12.3", "4096", "1.5e-05").
inline std::string fmt_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (v == 0) return "0";
  char buf[32];
  const double a = std::abs(v);
  if (a >= 1e5 || a < 1e-3) std::snprintf(buf, sizeof buf, "%.3g", v);
  else if (a >= 100) std::snprintf(buf, sizeof buf, "%.0f", v);
  else std::snprintf(buf, sizeof buf, "%.3g", v);
  std::string s = buf;
  return s == "-0" ? "0" : s;
}

// A coordinate: two decimals at most, trailing zeros dropped (keeps the file small).
inline std::string fmt_coord(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  std::string s = buf;
  if (s.find('.') != std::string::npos) {
    while (s.back() == '0') s.pop_back();
    if (s.back() == '.') s.pop_back();
  }
  return s == "-0" ? "0" : s;
}

inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Viridis (matplotlib), its 9 evenly spaced stops; colours between them are interpolated linearly.
inline constexpr unsigned char kViridis[9][3] = {
    {0x44, 0x01, 0x54}, {0x47, 0x2c, 0x7a}, {0x3b, 0x51, 0x8b}, {0x2c, 0x71, 0x8e}, {0x21, 0x90, 0x8d},
    {0x27, 0xad, 0x81}, {0x5c, 0xc8, 0x63}, {0xaa, 0xdc, 0x32}, {0xfd, 0xe7, 0x25}};

inline std::string colour_hex(const unsigned char rgb[3]) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", rgb[0], rgb[1], rgb[2]);
  return buf;
}

// Colour of t in [0, 1] (clamped).
inline std::string viridis(double t) {
  t = std::clamp(t, 0.0, 1.0) * 8;
  const int i = std::min(static_cast<int>(t), 7);
  const double f = t - i;
  unsigned char rgb[3];
  for (int c = 0; c < 3; ++c)
    rgb[c] = static_cast<unsigned char>(std::lround(kViridis[i][c] + f * (kViridis[i + 1][c] - kViridis[i][c])));
  return colour_hex(rgb);
}

// Mean of the values falling into one cell. A single value is kept as is (so a lone inf still
// says "inf"); a mean over any non-finite value is NaN and remembers how many there were.
struct Acc {
  double sum = 0;
  std::int64_t n = 0, bad = 0;
  float first = 0;
  void add(float x) {
    if (n++ == 0) first = x;
    if (std::isfinite(x)) sum += x;
    else ++bad;
  }
  double value() const {
    if (n == 1) return first;
    return bad ? std::numeric_limits<double>::quiet_NaN() : sum / static_cast<double>(n);
  }
};

// Counts of non-finite source values of a panel, for its caption.
struct NonFinite {
  std::int64_t nan = 0, inf = 0, total = 0;
  void add(float x) {
    ++total;
    if (std::isnan(x)) ++nan;
    else if (std::isinf(x)) ++inf;
  }
};

// One axis of a panel: its name, how many indices it spans, and how many indices one cell holds
// (> 1 only for binned tokens).
struct Axis {
  std::string name;
  std::int64_t extent = 0;
  std::int64_t bin = 1;
  std::vector<std::string> ticks = {};  // tick label per index; empty: the index
  std::vector<std::string> tips = {};   // tooltip name of each index; empty: name + " " + tick
  std::int64_t group = 1;               // tick steps above 1 are multiples of this (rows of a layer)
  std::int64_t cells() const { return (extent + bin - 1) / bin; }
  std::string tick(std::int64_t i) const {
    return ticks.empty() ? std::to_string(i) : ticks[static_cast<std::size_t>(i)];
  }
  // "head 3", "source emb", "layer 3 mlp", or "tokens 8-11" for a bin.
  std::string label(std::int64_t cell) const {
    if (bin == 1) return tips.empty() ? name + " " + tick(cell) : tips[static_cast<std::size_t>(cell)];
    const std::int64_t a = cell * bin, b = std::min(extent, a + bin) - 1;
    return name + "s " + std::to_string(a) + "-" + std::to_string(b);
  }
};

// Cells [x0, x1) × [y0, y1) of a panel to outline, and what the outline means.
struct Outline {
  std::int64_t x0 = 0, y0 = 0, x1 = 0, y1 = 0;
  std::string label;
};

struct Panel {
  std::string title;
  Axis x, y;
  std::vector<Acc> cells;        // y.cells() rows × x.cells() columns, row-major
  bool x_first = true;           // tooltip order follows the tensor's dimension order
  bool unit_scale = false;       // colour scale fixed to [0, 1]
  NonFinite nonfinite;
  std::vector<std::string> notes;  // caption lines (raw text, escaped when drawn)
  std::vector<Outline> outlines;   // marked cells
  double cw = 10, ch = 10;         // cell size in px
};

// Smallest step of 1, 2, 5, 10, 20, 50, ... indices whose labels are at least min_gap px apart.
inline std::int64_t tick_step(double px_per_index, double min_gap) {
  for (std::int64_t m = 1; m < (std::int64_t{1} << 60) / 10; m *= 10)
    for (std::int64_t f : {1, 2, 5})
      if (static_cast<double>(f * m) * px_per_index >= min_gap) return f * m;
  return std::int64_t{1} << 60;
}

inline double text_width(std::string_view s, double char_width = kCharWidth) {
  return static_cast<double>(s.size()) * char_width;
}

// Width of the widest tick label of an axis.
inline double widest_tick(const Axis& a) {
  if (a.ticks.empty()) return text_width(std::to_string(std::max<std::int64_t>(a.extent - 1, 0)));
  double w = 0;
  for (const std::string& t : a.ticks) w = std::max(w, text_width(t));
  return w;
}

// tick_step for an axis whose rows come in groups (a layer's sublayers): a step above 1 is
// rounded up to whole groups, so the labelled rows are always the same sublayer.
inline std::int64_t grouped_step(std::int64_t step, std::int64_t group) {
  return step > 1 && group > 1 ? (step + group - 1) / group * group : step;
}

// The SVG being built: body text, the lowest y used and the widest x reached.
struct Doc {
  std::string out;
  double width = 0;
  void reach(double x) { width = std::max(width, x); }

  void text(double x, double y, std::string_view raw, const char* attrs = "") {
    out += "<text x=\"" + fmt_coord(x) + "\" y=\"" + fmt_coord(y) + "\"" + (*attrs ? " " : "") + attrs + ">";
    append_xml(out, raw);
    out += "</text>\n";
  }
  void line(double x1, double y1, double x2, double y2) {
    out += "<line x1=\"" + fmt_coord(x1) + "\" y1=\"" + fmt_coord(y1) + "\" x2=\"" + fmt_coord(x2) + "\" y2=\"" +
           fmt_coord(y2) + "\"/>\n";
  }
};

// Draws one panel with its top-left corner at (x0, y0); returns its height.
inline double draw_panel(Doc& d, const Panel& p, double x0, double y0) {
  const std::int64_t rows = p.y.cells(), cols = p.x.cells();
  const double mw = static_cast<double>(cols) * p.cw, mh = static_cast<double>(rows) * p.ch;

  // Colour scale: [0, 1] for values known to lie there, else the drawn cells' finite range.
  double dmin = std::numeric_limits<double>::infinity(), dmax = -dmin;
  std::int64_t grey_cells = 0;
  for (const Acc& a : p.cells) {
    const double v = a.value();
    if (std::isfinite(v)) dmin = std::min(dmin, v), dmax = std::max(dmax, v);
    else ++grey_cells;
  }
  const bool any_finite = dmin <= dmax;
  const bool unit = p.unit_scale || !any_finite;
  const double lo = unit ? 0.0 : dmin, hi = unit ? 1.0 : dmax;
  const bool constant = !unit && lo == hi;
  auto colour_of = [&](double v) { return constant ? viridis(0.5) : viridis((v - lo) / (hi - lo)); };

  // Left margin: rotated axis title, then the widest row label.
  const double ml = 22 + widest_tick(p.y) + 10;
  const double mx = x0 + ml, my = y0 + 24;

  d.text(x0, y0 + 14, p.title, "font-size=\"13\" font-weight=\"bold\"");
  d.reach(x0 + text_width(p.title, 7.5));

  // What the outlines covering each cell mean, for its tooltip.
  std::vector<std::vector<std::string>> tags(p.outlines.empty() ? 0 : p.cells.size());
  for (const Outline& o : p.outlines)
    for (std::int64_t r = o.y0; r < o.y1; ++r)
      for (std::int64_t c = o.x0; c < o.x1; ++c) {
        auto& t = tags[static_cast<std::size_t>(r * cols + c)];
        if (std::find(t.begin(), t.end(), o.label) == t.end()) t.push_back(o.label);
      }

  // Cells. crispEdges: without it anti-aliasing draws faint seams between adjacent cells.
  d.out += "<g shape-rendering=\"crispEdges\">\n";
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) {
      const Acc& a = p.cells[static_cast<std::size_t>(r * cols + c)];
      const double v = a.value();
      d.out += "<rect x=\"" + fmt_coord(mx + static_cast<double>(c) * p.cw) + "\" y=\"" +
               fmt_coord(my + static_cast<double>(r) * p.ch) + "\" width=\"" + fmt_coord(p.cw) + "\" height=\"" +
               fmt_coord(p.ch) + "\" fill=\"" + (std::isfinite(v) ? colour_of(v) : kNonFiniteFill) + "\"><title>";
      append_xml(d.out, p.x_first ? p.x.label(c) + ", " + p.y.label(r) : p.y.label(r) + ", " + p.x.label(c));
      d.out += ": ";
      if (a.n > 1 && a.bad > 0)
        d.out += "not finite (" + std::to_string(a.bad) + " of " + std::to_string(a.n) + " values NaN or inf)";
      else
        d.out += fmt_value(v);
      if (!tags.empty() && !tags[static_cast<std::size_t>(r * cols + c)].empty()) {
        const auto& t = tags[static_cast<std::size_t>(r * cols + c)];
        d.out += " (";
        for (std::size_t i = 0; i < t.size(); ++i) {
          if (i) d.out += ", ";
          append_xml(d.out, t[i].empty() ? "marked" : t[i]);
        }
        d.out += ")";
      }
      d.out += "</title></rect>\n";
    }
  }
  d.out += "</g>\n<rect x=\"" + fmt_coord(mx) + "\" y=\"" + fmt_coord(my) + "\" width=\"" + fmt_coord(mw) +
           "\" height=\"" + fmt_coord(mh) + "\" fill=\"none\" stroke=\"#444\" stroke-width=\"0.6\"/>\n";

  // Outlines of marked cells, on top of the cells and the frame, drawn inside their cells so
  // that neighbouring outlines do not overlap.
  std::vector<std::string> mark_labels;
  for (const Outline& o : p.outlines) {
    const double w = static_cast<double>(o.x1 - o.x0) * p.cw, h = static_cast<double>(o.y1 - o.y0) * p.ch;
    const double in = std::min({0.75, w / 4, h / 4});
    d.out += "<rect x=\"" + fmt_coord(mx + static_cast<double>(o.x0) * p.cw + in) + "\" y=\"" +
             fmt_coord(my + static_cast<double>(o.y0) * p.ch + in) + "\" width=\"" + fmt_coord(w - 2 * in) +
             "\" height=\"" + fmt_coord(h - 2 * in) + "\" fill=\"none\" stroke=\"" + kMarkStroke +
             "\" stroke-width=\"1.5\"/>\n";
    if (std::find(mark_labels.begin(), mark_labels.end(), o.label) == mark_labels.end()) mark_labels.push_back(o.label);
  }

  // Axes: ticks at cell centres (tokens: at the token's position inside its bin).
  d.out += "<g stroke=\"#444\" stroke-width=\"0.8\">\n";
  const double px_per_y = p.ch / static_cast<double>(p.y.bin);
  const std::int64_t ys = grouped_step(tick_step(px_per_y, 12), p.y.group);
  for (std::int64_t i = 0; i < p.y.extent; i += ys) {
    const double y = my + (static_cast<double>(i) + 0.5) * px_per_y;
    d.line(mx - 4, y, mx, y);
  }
  const double px_per_x = p.cw / static_cast<double>(p.x.bin);
  const std::int64_t xs = grouped_step(tick_step(px_per_x, widest_tick(p.x) + 16), p.x.group);
  for (std::int64_t i = 0; i < p.x.extent; i += xs) {
    const double x = mx + (static_cast<double>(i) + 0.5) * px_per_x;
    d.line(x, my + mh, x, my + mh + 4);
  }
  d.out += "</g>\n<g fill=\"#222\">\n";
  for (std::int64_t i = 0; i < p.y.extent; i += ys)
    d.text(mx - 6, my + (static_cast<double>(i) + 0.5) * px_per_y + 4, p.y.tick(i), "text-anchor=\"end\"");
  for (std::int64_t i = 0; i < p.x.extent; i += xs)
    d.text(mx + (static_cast<double>(i) + 0.5) * px_per_x, my + mh + 15, p.x.tick(i), "text-anchor=\"middle\"");
  d.text(mx + mw / 2, my + mh + 29, p.x.name, "text-anchor=\"middle\" font-style=\"italic\"");
  {
    // Centred on the map, or on the title's own length when the map is shorter than the title.
    const double yc = my + std::max(mh, text_width(p.y.name) + 4) / 2;
    const std::string at = "text-anchor=\"middle\" font-style=\"italic\" transform=\"rotate(-90 " + fmt_coord(x0 + 10) +
                           " " + fmt_coord(yc) + ")\"";
    d.text(x0 + 10, yc + 4, p.y.name, at.c_str());
  }
  d.out += "</g>\n";

  // Colour bar, min at the bottom; at least 60 px tall so its two labels never touch, and clear
  // of the x-axis title under a narrow map.
  const double bx = mx + std::max(mw, mw / 2 + text_width(p.x.name) / 2 + 6) + 14, bw = 12, bh = std::max(mh, 60.0);
  d.out += "<rect x=\"" + fmt_coord(bx) + "\" y=\"" + fmt_coord(my) + "\" width=\"" + fmt_coord(bw) + "\" height=\"" +
           fmt_coord(bh) + "\" fill=\"" + (constant ? viridis(0.5) : std::string("url(#attnkit-viridis)")) +
           "\" stroke=\"#444\" stroke-width=\"0.6\"/>\n";
  std::string bar_hi = fmt_value(hi), bar_lo = fmt_value(lo);
  if (constant) {
    d.text(bx + bw + 4, my + bh / 2 + 4, bar_hi);
  } else {
    d.text(bx + bw + 4, my + 8, bar_hi);
    d.text(bx + bw + 4, my + bh, bar_lo);
  }
  d.reach(bx + bw + 4 + text_width(std::max(bar_hi, bar_lo, [](auto& a, auto& b) { return a.size() < b.size(); })));
  if (unit && any_finite) {
    // On a fixed [0, 1] scale, triangles left of the bar mark where the drawn values lie.
    for (auto [v, what] : {std::pair{dmin, "drawn min "}, std::pair{dmax, "drawn max "}}) {
      const double y = my + bh * (1 - std::clamp(v, 0.0, 1.0));
      d.out += "<polygon points=\"" + fmt_coord(bx - 1) + "," + fmt_coord(y) + " " + fmt_coord(bx - 7) + "," +
               fmt_coord(y - 3.5) + " " + fmt_coord(bx - 7) + "," + fmt_coord(y + 3.5) + "\" fill=\"#222\"><title>" +
               what + fmt_value(v) + "</title></polygon>\n";
    }
  }

  // Caption: the panel's own notes (shape, binning), the scale, then the non-finite count.
  double y = my + std::max({mh + 34, bh + 6, text_width(p.y.name) + 8}) + 12;
  std::vector<std::string> lines = p.notes;
  if (!any_finite)
    lines.push_back("no finite values: every cell is grey");
  else if (unit)
    lines.push_back("colour scale fixed to [0, 1] (every finite value lies in [0, 1]); " +
                    (dmin == dmax ? "every drawn value is " + fmt_value(dmin)
                                  : "drawn values from " + fmt_value(dmin) + " to " + fmt_value(dmax)));
  else if (constant)
    lines.push_back("constant: every drawn value is " + fmt_value(dmin));
  else
    lines.push_back("colour scale from the drawn min " + fmt_value(dmin) + " to the drawn max " + fmt_value(dmax));
  for (const std::string& l : lines) {
    d.text(x0, y, l, "fill=\"#333\"");
    d.reach(x0 + text_width(l));
    y += 14;
  }
  if (p.nonfinite.nan + p.nonfinite.inf > 0) {
    // A swatch of the grey, so the caption explains itself.
    d.out += "<rect x=\"" + fmt_coord(x0) + "\" y=\"" + fmt_coord(y - 9) + "\" width=\"10\" height=\"10\" fill=\"" +
             kNonFiniteFill + "\" stroke=\"#444\" stroke-width=\"0.6\"/>\n";
    std::string l = "grey: " + std::to_string(grey_cells) + " non-finite cell" + (grey_cells == 1 ? "" : "s") + " (";
    if (p.nonfinite.nan) l += std::to_string(p.nonfinite.nan) + " NaN";
    if (p.nonfinite.nan && p.nonfinite.inf) l += ", ";
    if (p.nonfinite.inf) l += std::to_string(p.nonfinite.inf) + " inf";
    l += " among the " + std::to_string(p.nonfinite.total) + " values)";
    d.text(x0 + 14, y, l, "fill=\"#333\"");
    d.reach(x0 + 14 + text_width(l));
    y += 14;
  }
  for (const std::string& m : mark_labels) {
    // A swatch of the outline, then what it means.
    d.out += "<rect x=\"" + fmt_coord(x0 + 0.75) + "\" y=\"" + fmt_coord(y - 8.25) +
             "\" width=\"8.5\" height=\"8.5\" fill=\"none\" stroke=\"" + kMarkStroke + "\" stroke-width=\"1.5\"/>\n";
    const std::string l = "outlined: " + (m.empty() ? std::string("marked cells") : m);
    d.text(x0 + 14, y, l, "fill=\"#333\"");
    d.reach(x0 + 14 + text_width(l));
    y += 14;
  }
  return y - y0;
}

// Cell sizes: token strips about 720 px wide, rows about 200 px tall, within readable limits.
inline double token_cell_width(std::int64_t cols) { return std::clamp(720.0 / static_cast<double>(cols), 1.0, 16.0); }
inline double row_height(std::int64_t rows) { return std::clamp(200.0 / static_cast<double>(rows), 3.0, 14.0); }

inline std::string plural(std::int64_t n, const std::string& noun) {
  return std::to_string(n) + " " + noun + (n == 1 ? "" : "s");
}

// Token binning of a [.., T, ..] tensor: equal bins of ceil(T / max_tokens) tokens.
inline Axis token_axis(const std::string& name, std::int64_t T, int max_tokens) {
  Axis a{name, T, 1};
  if (T > max_tokens) a.bin = (T + max_tokens - 1) / max_tokens;
  return a;
}

inline std::string bin_note(const Axis& x, int max_tokens) {
  if (x.bin == 1) return {};
  const std::int64_t last = x.extent - (x.cells() - 1) * x.bin;
  std::string s = plural(x.extent, x.name) + " > max_tokens = " + std::to_string(max_tokens) +
                  ": each column is the mean of " + plural(x.bin, x.name);
  if (last != x.bin) s += " (the last of " + std::to_string(last) + ")";
  return s;
}

// Tick labels of dimension k of t (empty: indices).
inline std::vector<std::string> ticks_of(const TraceTensor& t, std::size_t k) {
  return t.labels.empty() ? std::vector<std::string>{} : t.labels[k];
}

// The token axis of a tensor of rank r, which marks leave out: the next-to-last dimension, the
// last one of a 2-D [row, token] (and of a 1-D one).
inline std::size_t token_dim(std::size_t rank) { return rank >= 3 ? rank - 2 : rank == 2 ? 1 : 0; }

// A 3-D [layer, token, K] tensor, or a 4-D [A, B, token, K] one with its A·B (layer, sublayer)
// rows folded into one axis: row r = a·B + b, which is also where its data lie (row-major), so a
// 4-D tensor is drawn as a 3-D one with A·B rows.
struct Rows {
  std::int64_t R = 0, T = 0, K = 0;
  Axis rows;                     // extent R; ticks "3" / "3 mlp", tooltip names "layer 3" / "layer 3 mlp"
  std::string rows_noun;         // the note on rows without a finite value: "layer" / "row"
  std::int64_t per_layer = 1;    // rows of one layer (B): opt.strip_layer picks a layer
  std::string tn, kn;            // token and K axis names
  std::vector<std::string> tticks, kticks;
  std::string shape_note;        // "shape [3, 5, 4] = (layer, token, head)"
  bool rows_down = false;        // mean map: rows down, K across (4-D), or layers across, K down (3-D)
  struct Mark {
    std::int64_t row, k;
    std::string label;
  };
  std::vector<Mark> marks;
};

inline Rows fold(const TraceTensor& t) {
  auto dim = [&](std::size_t k, const char* fallback) { return t.dims.empty() ? std::string(fallback) : t.dims[k]; };
  Rows f;
  const bool four = t.shape.size() == 4;
  const std::int64_t A = t.shape[0], B = four ? t.shape[1] : 1;
  f.R = A * B;
  f.T = t.shape[four ? 2 : 1];
  f.K = t.shape[four ? 3 : 2];
  f.tn = dim(four ? 2 : 1, "token");
  f.kn = dim(four ? 3 : 2, four ? "source" : "head");
  f.tticks = ticks_of(t, four ? 2 : 1);
  f.kticks = ticks_of(t, four ? 3 : 2);
  const std::string an = dim(0, "layer");
  f.shape_note = "shape " + shape_string(t.shape) + " = (" + an + ", ";
  if (!four) {
    f.rows = Axis{an, A, 1, ticks_of(t, 0)};
    f.rows_noun = an;
    for (const TraceMark& m : t.marks) f.marks.push_back({m.index[0], m.index[1], m.label});
  } else {
    const std::string bn = dim(1, "sublayer");
    const std::vector<std::string> at = ticks_of(t, 0), bt = ticks_of(t, 1);
    f.rows = Axis{an + " \xc2\xb7 " + bn, f.R, 1};
    f.rows.group = B;
    for (std::int64_t a = 0; a < A; ++a)
      for (std::int64_t b = 0; b < B; ++b) {
        const std::string as = at.empty() ? std::to_string(a) : at[static_cast<std::size_t>(a)];
        const std::string bs = bt.empty() ? std::to_string(b) : bt[static_cast<std::size_t>(b)];
        f.rows.ticks.push_back(as + (bt.empty() ? "\xc2\xb7" : " ") + bs);  // "3 mlp", or "3·1"
        f.rows.tips.push_back(an + " " + as + (bt.empty() ? ", " + bn + " " : " ") + bs);
      }
    f.rows_noun = "row";
    f.per_layer = B;
    f.rows_down = true;
    f.shape_note += bn + ", ";
    for (const TraceMark& m : t.marks) f.marks.push_back({m.index[0] * B + m.index[1], m.index[2], m.label});
  }
  f.shape_note += f.tn + ", " + f.kn + ")";
  return f;
}

// Draws the two panels of a 3-D or folded 4-D tensor at (x0, y); returns the y below them.
inline double draw_rows(Doc& d, const TraceTensor& t, const Rows& f, const std::string& name, bool unit,
                        const PlotOptions& opt, double x0, double y) {
  const std::int64_t R = f.R, T = f.T, K = f.K;
  const auto at = [&](std::int64_t r, std::int64_t tok, std::int64_t k) {
    return t.data[static_cast<std::size_t>((r * T + tok) * K + k)];
  };
  // (a) rows × K, mean over tokens: which layers and heads (sources) use the mechanism.
  Panel a;
  a.title = name + ": mean over " + plural(T, f.tn);
  a.unit_scale = unit;
  const Axis k_axis{f.kn, K, 1, f.kticks};
  if (f.rows_down) {
    a.x = k_axis;
    a.y = f.rows;
    a.x_first = false;  // tensor order: row, then K
    a.ch = std::clamp(720.0 / static_cast<double>(R), 3.0, 14.0);
    a.cw = std::clamp(720.0 / static_cast<double>(K), 3.0, 28.0);
  } else {
    a.x = f.rows;
    a.y = k_axis;
    a.x_first = true;
    a.ch = row_height(K);
    a.cw = std::clamp(480.0 / static_cast<double>(R), 4.0, 28.0);
  }
  const auto cell = [&](std::int64_t r, std::int64_t k) { return static_cast<std::size_t>(f.rows_down ? r * K + k : k * R + r); };
  a.cells.resize(static_cast<std::size_t>(K * R));
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t tok = 0; tok < T; ++tok)
      for (std::int64_t k = 0; k < K; ++k) {
        a.cells[cell(r, k)].add(at(r, tok, k));
        a.nonfinite.add(at(r, tok, k));
      }
  for (const Rows::Mark& m : f.marks) {
    const std::int64_t x = f.rows_down ? m.k : m.row, yy = f.rows_down ? m.row : m.k;
    a.outlines.push_back({x, yy, x + 1, yy + 1, m.label});
  }
  a.notes.push_back(f.shape_note);
  // Rows without a single finite value are usually layers without the mechanism (a model trace
  // records NaN there): name them rather than leave the reader to guess.
  std::vector<std::int64_t> empty_rows;
  for (std::int64_t r = 0; r < R; ++r) {
    bool any = false;
    for (std::int64_t i = 0; i < T * K && !any; ++i) any = std::isfinite(t.data[static_cast<std::size_t>(r * T * K + i)]);
    if (!any) empty_rows.push_back(r);
  }
  if (!empty_rows.empty()) {
    std::string l = "no finite value in " + f.rows_noun + (empty_rows.size() == 1 ? " " : "s ");
    for (std::size_t i = 0; i < empty_rows.size() && i < 16; ++i) l += (i ? ", " : "") + f.rows.tick(empty_rows[i]);
    if (empty_rows.size() > 16) l += ", ... (" + std::to_string(empty_rows.size()) + " in all)";
    a.notes.push_back(l);
  }
  y += draw_panel(d, a, x0, y) + 14;

  // (b) token × K for one row: where in the sequence it acts. The default is the last row that
  // holds a finite value (of layer opt.strip_layer, if given), else the last one.
  const std::int64_t first = opt.strip_layer < 0 ? 0 : opt.strip_layer * f.per_layer;
  const std::int64_t last = opt.strip_layer < 0 ? R - 1 : first + f.per_layer - 1;
  const auto is_empty = [&](std::int64_t r) { return std::find(empty_rows.begin(), empty_rows.end(), r) != empty_rows.end(); };
  std::int64_t row = last;
  while (row > first && is_empty(row)) --row;
  if (is_empty(row)) row = last;
  Panel b;
  b.x = token_axis(f.tn, T, opt.max_tokens);
  b.x.ticks = f.tticks;
  b.y = k_axis;
  b.title = name + ", " + f.rows.label(row) + ": per " + f.tn;
  if (b.x.bin > 1) b.title += " (means over bins of " + plural(b.x.bin, f.tn) + ")";
  b.x_first = true;
  b.unit_scale = unit;
  b.ch = row_height(K);
  b.cw = token_cell_width(b.x.cells());
  const std::int64_t cols = b.x.cells();
  b.cells.resize(static_cast<std::size_t>(K * cols));
  for (std::int64_t tok = 0; tok < T; ++tok)
    for (std::int64_t k = 0; k < K; ++k) {
      b.cells[static_cast<std::size_t>(k * cols + tok / b.x.bin)].add(at(row, tok, k));
      b.nonfinite.add(at(row, tok, k));
    }
  for (const Rows::Mark& m : f.marks)
    if (m.row == row) b.outlines.push_back({0, m.k, cols, m.k + 1, m.label});
  if (b.x.bin > 1) b.notes.push_back(bin_note(b.x, opt.max_tokens));
  return y + draw_panel(d, b, x0, y) + 26;
}

// Whether t is a selection of key positions per query (see the top of this file).
inline bool is_selection(const TraceTensor& t) {
  return t.shape.size() == 3 && (t.name == "topk_indices" || (t.dims.size() == 3 && t.dims[2] == "selected key"));
}

// A selection [layer, token, K] drawn as a query × key map of one layer; returns the y below it.
inline double draw_selection(Doc& d, const TraceTensor& t, const std::string& name, const PlotOptions& opt, double x0,
                             double y) {
  const std::int64_t L = t.shape[0], T = t.shape[1], K = t.shape[2];
  const auto value = [&](std::int64_t l, std::int64_t tok, std::int64_t k) {
    return t.data[static_cast<std::size_t>((l * T + tok) * K + k)];
  };
  std::vector<std::int64_t> with;  // layers holding a selection (a finite value)
  for (std::int64_t l = 0; l < L; ++l) {
    bool any = false;
    for (std::int64_t i = 0; i < T * K && !any; ++i) any = std::isfinite(t.data[static_cast<std::size_t>(l * T * K + i)]);
    if (any) with.push_back(l);
  }
  const std::int64_t layer = opt.strip_layer >= 0 ? opt.strip_layer : with.empty() ? L - 1 : with.back();
  const bool has = std::find(with.begin(), with.end(), layer) != with.end();
  const std::string dn = t.dims.size() == 3 ? t.dims[0] : std::string("layer");
  Panel p;
  p.x = token_axis("key", T, opt.max_tokens);
  p.y = token_axis("query token", T, opt.max_tokens);
  p.title = name + ", " + dn + " " + std::to_string(layer) + ": the keys each query kept";
  if (p.x.bin > 1) p.title += " (share kept in bins of " + plural(p.x.bin, "token") + ")";
  p.x_first = false;
  p.unit_scale = true;
  const std::int64_t cols = p.x.cells(), rows = p.y.cells();
  p.cw = p.ch = std::clamp(560.0 / static_cast<double>(cols), 1.0, 14.0);
  p.cells.resize(static_cast<std::size_t>(rows * cols));
  std::int64_t outside = 0;  // entries that are not -1 and not a key position in [0, T)
  std::vector<char> kept(static_cast<std::size_t>(T));
  for (std::int64_t q = 0; q < T; ++q) {
    std::fill(kept.begin(), kept.end(), 0);
    bool finite = true;
    for (std::int64_t k = 0; k < K; ++k) {
      const float v = value(layer, q, k);
      if (!std::isfinite(v)) {
        finite = false;
        continue;
      }
      if (v == -1.f) continue;
      if (v < 0.f || v >= static_cast<float>(T) || v != std::floor(v)) {
        ++outside;
        continue;
      }
      kept[static_cast<std::size_t>(v)] = 1;
    }
    for (std::int64_t s = 0; s < T; ++s) {
      const float c = finite ? static_cast<float>(kept[static_cast<std::size_t>(s)]) : std::numeric_limits<float>::quiet_NaN();
      p.cells[static_cast<std::size_t>((q / p.y.bin) * cols + s / p.x.bin)].add(c);
      p.nonfinite.add(c);
    }
  }
  p.notes.push_back("shape " + shape_string(t.shape) + " = (" + dn + ", token, selected key): cell (query t, key s) is 1 when "
                    "query t kept key s among its top " + std::to_string(K) + ", else 0; keys after the query are never kept");
  std::string l = with.empty() ? "no " + dn + " holds a selection" : dn + (with.size() == 1 ? " " : "s ") ;
  for (std::size_t i = 0; i < with.size() && i < 16; ++i) l += (i ? ", " : "") + std::to_string(with[i]);
  if (with.size() > 16) l += ", ... (" + std::to_string(with.size()) + " in all)";
  if (!with.empty()) l += with.size() == 1 ? " holds a selection" : " hold selections";
  if (!has) l += "; " + dn + " " + std::to_string(layer) + " holds none (grey)";
  p.notes.push_back(l);
  if (outside > 0) p.notes.push_back(std::to_string(outside) + " entries are neither -1 nor a key position in [0, " +
                                     std::to_string(T) + ") and are not drawn");
  if (p.x.bin > 1) p.notes.push_back(bin_note(p.x, opt.max_tokens) + ", on both axes");
  return y + draw_panel(d, p, x0, y) + 26;
}

inline std::string render(const std::vector<TraceTensor>& trace, const PlotOptions& opt, const char* fn) {
  ATTNKIT_REQUIRE(!trace.empty(), fn, ": trace: is empty (nothing to draw)");
  ATTNKIT_REQUIRE(opt.max_tokens >= 1, fn, ": opt.max_tokens: must be at least 1, got ", opt.max_tokens);
  ATTNKIT_REQUIRE(opt.strip_layer >= -1, fn, ": opt.strip_layer: must be -1 (last layer) or a layer index, got ",
                  opt.strip_layer);
  // Validate everything before drawing anything.
  for (std::size_t i = 0; i < trace.size(); ++i) {
    const TraceTensor& t = trace[i];
    std::int64_t n = 1;
    bool overflow = false;
    for (std::int64_t s : t.shape) {
      ATTNKIT_REQUIRE(s >= 0, fn, ": trace[", i, "] '", t.name, "': shape ", shape_string(t.shape),
                      " has a negative dimension");
      if (s != 0 && n > std::numeric_limits<std::int64_t>::max() / s) overflow = true;
      else n *= s;
    }
    ATTNKIT_REQUIRE(!overflow && static_cast<std::uint64_t>(n) == t.data.size(), fn, ": trace[", i, "] '", t.name,
                    "': shape ", shape_string(t.shape), " holds ", overflow ? std::string("too many") : std::to_string(n),
                    " values but data has ", t.data.size());
    ATTNKIT_REQUIRE(t.dims.empty() || t.dims.size() == t.shape.size(), fn, ": trace[", i, "] '", t.name, "': dims has ",
                    t.dims.size(), " names for a shape of rank ", t.shape.size());
    const std::size_t rank = t.shape.size();
    auto dim_name = [&](std::size_t k) {
      return "dimension " + std::to_string(k) + (t.dims.empty() ? std::string() : " (" + t.dims[k] + ")");
    };
    ATTNKIT_REQUIRE(t.labels.empty() || t.labels.size() == rank, fn, ": trace[", i, "] '", t.name, "': labels has ",
                    t.labels.size(), " lists for a shape of rank ", rank, " (one per dimension, empty for indices)");
    for (std::size_t k = 0; k < t.labels.size(); ++k)
      ATTNKIT_REQUIRE(t.labels[k].empty() || static_cast<std::int64_t>(t.labels[k].size()) == t.shape[k], fn, ": trace[",
                      i, "] '", t.name, "': labels[", k, "] has ", t.labels[k].size(), " labels for ", dim_name(k),
                      " of extent ", t.shape[k]);
    const std::size_t tok = token_dim(rank), want = rank == 0 ? 0 : rank - 1;
    for (std::size_t j = 0; j < t.marks.size(); ++j) {
      const auto& ix = t.marks[j].index;
      std::string ixs = "{";
      for (std::size_t k = 0; k < ix.size(); ++k) ixs += (k ? ", " : "") + std::to_string(ix[k]);
      ixs += "}";
      ATTNKIT_REQUIRE(ix.size() == want, fn, ": trace[", i, "] '", t.name, "': marks[", j, "] index ", ixs, " has ",
                      ix.size(), " entries, needs ", want, " (one per dimension except the token axis, dimension ", tok,
                      ")");
      for (std::size_t k = 0; k < ix.size(); ++k) {
        const std::size_t dk = k < tok ? k : k + 1;
        ATTNKIT_REQUIRE(ix[k] >= 0 && ix[k] < t.shape[dk], fn, ": trace[", i, "] '", t.name, "': marks[", j, "] index ",
                        ixs, ": ", ix[k], " is out of range for ", dim_name(dk), " of extent ", t.shape[dk]);
      }
    }
    if ((rank == 3 || rank == 4) && n > 0)
      ATTNKIT_REQUIRE(opt.strip_layer < t.shape[0], fn, ": opt.strip_layer: layer ", opt.strip_layer,
                      " is out of range for trace[", i, "] '", t.name, "' with ", t.shape[0], " layers");
  }

  Doc d;
  const double x0 = 16;
  double y = 0;
  const std::string heading = opt.title.empty() ? "attnkit trace" : opt.title;
  d.text(x0, 26, heading, "font-size=\"16\" font-weight=\"bold\"");
  d.reach(x0 + text_width(heading, 9.5));
  {
    std::string summary = plural(static_cast<std::int64_t>(trace.size()), "tensor") + ":";
    for (std::size_t i = 0; i < trace.size(); ++i)
      summary += (i ? ", " : " ") + (trace[i].name.empty() ? "(unnamed)" : trace[i].name) + " " +
                 shape_string(trace[i].shape);
    summary += " (indices are 0-based; hover a cell for its value)";
    d.text(x0, 44, summary, "fill=\"#333\"");
    d.reach(x0 + text_width(summary));
  }
  y = 68;

  for (const TraceTensor& t : trace) {
    const std::string name = t.name.empty() ? "(unnamed)" : t.name;
    const std::size_t rank = t.shape.size();
    auto dim = [&](std::size_t k, const char* fallback) { return t.dims.empty() ? std::string(fallback) : t.dims[k]; };
    const bool drawable = rank >= 2 && rank <= 4 && !t.data.empty();
    if (!drawable) {
      const std::string why = rank >= 2 && rank <= 4 ? "it has no values"
                                                     : "only 2-D [row, token], 3-D [layer, token, K] and 4-D "
                                                       "[layer, sublayer, token, K] tensors are drawn";
      const std::string l = name + " " + shape_string(t.shape) + ": not drawn (" + why + ")";
      d.text(x0, y + 14, l, "font-style=\"italic\" fill=\"#555\"");
      d.reach(x0 + text_width(l));
      y += 30;
      continue;
    }
    // Gates, probabilities and softmax weights lie in [0, 1]: a fixed scale makes pictures comparable.
    bool unit = true;
    for (float v : t.data)
      if (std::isfinite(v) && (v < 0.f || v > 1.f)) { unit = false; break; }

    if (is_selection(t)) {
      y = draw_selection(d, t, name, opt, x0, y);
    } else if (rank >= 3) {
      y = draw_rows(d, t, fold(t), name, unit, opt, x0, y);
    } else {
      const std::int64_t S = t.shape[0], T = t.shape[1];
      const std::string rn = dim(0, "row"), tn = dim(1, "token");
      Panel p;
      p.x = token_axis(tn, T, opt.max_tokens);
      p.x.ticks = ticks_of(t, 1);
      p.y = Axis{rn, S, 1, ticks_of(t, 0)};
      p.title = name + ": per " + rn + " and " + tn;
      if (p.x.bin > 1) p.title += " (means over bins of " + plural(p.x.bin, tn) + ")";
      p.x_first = false;  // tensor order: row, then token
      p.unit_scale = unit;
      p.ch = row_height(S);
      p.cw = token_cell_width(p.x.cells());
      const std::int64_t cols = p.x.cells();
      p.cells.resize(static_cast<std::size_t>(S * cols));
      for (std::int64_t s = 0; s < S; ++s)
        for (std::int64_t tok = 0; tok < T; ++tok) {
          const float v = t.data[static_cast<std::size_t>(s * T + tok)];
          p.cells[static_cast<std::size_t>(s * cols + tok / p.x.bin)].add(v);
          p.nonfinite.add(v);
        }
      for (const TraceMark& m : t.marks) p.outlines.push_back({0, m.index[0], cols, m.index[0] + 1, m.label});
      p.notes.push_back("shape " + shape_string(t.shape) + " = (" + rn + ", " + tn + ")");
      if (p.x.bin > 1) p.notes.push_back(bin_note(p.x, opt.max_tokens));
      y += draw_panel(d, p, x0, y) + 26;
    }
  }

  const double W = std::ceil(d.width + 16), H = std::ceil(y);
  std::string svg;
  svg.reserve(d.out.size() + 1024);
  svg += "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  svg += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + fmt_coord(W) + "\" height=\"" + fmt_coord(H) +
         "\" viewBox=\"0 0 " + fmt_coord(W) + " " + fmt_coord(H) + "\" font-family=\"sans-serif\" font-size=\"11\">\n";
  svg += "<title>";
  append_xml(svg, heading);
  svg += "</title>\n<defs><linearGradient id=\"attnkit-viridis\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">\n";
  for (int i = 0; i < 9; ++i)
    svg += "<stop offset=\"" + fmt_coord(i / 8.0) + "\" stop-color=\"" + colour_hex(kViridis[i]) + "\"/>\n";
  svg += "</linearGradient></defs>\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  svg += d.out;
  svg += "</svg>\n";
  return svg;
}

}  // namespace detail

// The trace as one self-contained SVG document (see the contract at the top of this file).
inline std::string plot_trace_svg(const std::vector<TraceTensor>& trace, const PlotOptions& opt = {}) {
  return detail::render(trace, opt, "plot_trace_svg");
}

// Writes plot_trace_svg(trace, opt) to file (replacing it). Nothing is written if the trace is bad.
inline void write_trace_svg(const std::filesystem::path& file, const std::vector<TraceTensor>& trace,
                            const PlotOptions& opt = {}) {
  const std::string svg = detail::render(trace, opt, "write_trace_svg");
  std::ofstream os(file, std::ios::binary | std::ios::trunc);
  ATTNKIT_REQUIRE(os.is_open(), "write_trace_svg: file: cannot open '", file.string(), "' for writing (",
                  std::strerror(errno), ")");
  os.write(svg.data(), static_cast<std::streamsize>(svg.size()));
  os.close();
  ATTNKIT_REQUIRE(!os.fail(), "write_trace_svg: file: writing '", file.string(), "' failed");
}

}  // namespace attnkit::viz
