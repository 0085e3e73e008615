// attnkit/viz/trace_plot.hpp — pictures of a mechanism's internals: a trace drawn as one SVG.
//
// A trace is a list of named float32 tensors that a model run recorded (Loop Attention's gates
// [layers, T, heads], routing weights [layers, T, sources], an exit probability [steps, T], ...).
// plot_trace_svg turns it into one self-contained SVG (no scripts, no external files, no
// dependencies) that a researcher reads at a glance in a browser:
//
//  * 3-D [layer, token, K]: (a) a layer × K heat map of the mean over tokens — which layers and
//    heads use the mechanism at all — and (b) a token × K strip of one layer (opt.strip_layer,
//    default the last layer holding a finite value) — where in the sequence it acts.
//  * 2-D [row, token]: one heat map, rows × tokens.
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
// averaged away). Layers with no finite value at all are listed under the layer map.
//
// Each cell carries a <title> tooltip with its indices and value ("layer 1, head 3: 0.734", three
// significant digits). Indices are 0-based, as in the tensor and opt.strip_layer. When a tensor
// has more than opt.max_tokens tokens, tokens are averaged into equal bins (at most max_tokens
// columns) and the title and caption say so; this bounds the file size (about 110 bytes a cell).
// Axis titles and tooltips use TraceTensor::dims when given ("source", "step"), else "layer",
// "token", "head" / "row". Names and titles are XML-escaped; control characters and invalid
// UTF-8 become '?'.
//
// Errors (empty trace, shape / data size mismatch, bad options, unwritable file) throw
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

namespace attnkit::viz {

struct TraceTensor {
  std::string name;
  std::vector<std::int64_t> shape;  // row-major
  std::vector<float> data;
  // Optional axis names, one per dimension (e.g. {"layer", "token", "source"}, {"step", "token"}):
  // used in axis titles and tooltips. Empty: "layer", "token", "head" (3-D); "row", "token" (2-D).
  std::vector<std::string> dims = {};
};

struct PlotOptions {
  // Layer for the token × K strip; -1 -> the last layer that holds a finite value (the last layer
  // if none does): model traces fill layers without the mechanism with NaN, and a default strip
  // of nothing but grey would show nothing.
  std::int64_t strip_layer = -1;
  std::string title;              // heading of the picture; empty -> "attnkit trace"
  int max_tokens = 512;           // wider traces are averaged into bins (said in the caption)
};

namespace detail {

inline constexpr double kCharWidth = 6.5;  // rough advance of an 11 px sans-serif glyph (layout only)
inline constexpr const char* kNonFiniteFill = "#c8c8c8";  // light grey: not on the viridis ramp

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
  std::int64_t cells() const { return (extent + bin - 1) / bin; }
  // "head 3", or "tokens 8-11" for a bin.
  std::string label(std::int64_t cell) const {
    if (bin == 1) return name + " " + std::to_string(cell);
    const std::int64_t a = cell * bin, b = std::min(extent, a + bin) - 1;
    return name + "s " + std::to_string(a) + "-" + std::to_string(b);
  }
};

struct Panel {
  std::string title;
  Axis x, y;
  std::vector<Acc> cells;        // y.cells() rows × x.cells() columns, row-major
  bool x_first = true;           // tooltip order follows the tensor's dimension order
  bool unit_scale = false;       // colour scale fixed to [0, 1]
  NonFinite nonfinite;
  std::vector<std::string> notes;  // caption lines (raw text, escaped when drawn)
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
  const double ml = 22 + text_width(std::to_string(std::max<std::int64_t>(p.y.extent - 1, 0))) + 10;
  const double mx = x0 + ml, my = y0 + 24;

  d.text(x0, y0 + 14, p.title, "font-size=\"13\" font-weight=\"bold\"");
  d.reach(x0 + text_width(p.title, 7.5));

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
      d.out += "</title></rect>\n";
    }
  }
  d.out += "</g>\n<rect x=\"" + fmt_coord(mx) + "\" y=\"" + fmt_coord(my) + "\" width=\"" + fmt_coord(mw) +
           "\" height=\"" + fmt_coord(mh) + "\" fill=\"none\" stroke=\"#444\" stroke-width=\"0.6\"/>\n";

  // Axes: ticks at cell centres (tokens: at the token's position inside its bin).
  d.out += "<g stroke=\"#444\" stroke-width=\"0.8\">\n";
  const std::int64_t ys = tick_step(p.ch, 12);
  for (std::int64_t i = 0; i < p.y.extent; i += ys) {
    const double y = my + (static_cast<double>(i) + 0.5) * p.ch;
    d.line(mx - 4, y, mx, y);
  }
  const double px_per_x = p.cw / static_cast<double>(p.x.bin);
  const std::int64_t xs = tick_step(px_per_x, text_width(std::to_string(p.x.extent - 1)) + 16);
  for (std::int64_t i = 0; i < p.x.extent; i += xs) {
    const double x = mx + (static_cast<double>(i) + 0.5) * px_per_x;
    d.line(x, my + mh, x, my + mh + 4);
  }
  d.out += "</g>\n<g fill=\"#222\">\n";
  for (std::int64_t i = 0; i < p.y.extent; i += ys)
    d.text(mx - 6, my + (static_cast<double>(i) + 0.5) * p.ch + 4, std::to_string(i), "text-anchor=\"end\"");
  for (std::int64_t i = 0; i < p.x.extent; i += xs)
    d.text(mx + (static_cast<double>(i) + 0.5) * px_per_x, my + mh + 15, std::to_string(i), "text-anchor=\"middle\"");
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
    if (t.shape.size() == 3 && n > 0)
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
    const bool drawable = (rank == 2 || rank == 3) && !t.data.empty();
    if (!drawable) {
      const std::string why = rank == 2 || rank == 3 ? "it has no values"
                                                     : "only 2-D [row, token] and 3-D [layer, token, K] tensors are drawn";
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

    if (rank == 3) {
      const std::int64_t L = t.shape[0], T = t.shape[1], K = t.shape[2];
      const std::string ln = dim(0, "layer"), tn = dim(1, "token"), kn = dim(2, "head");
      const auto at = [&](std::int64_t l, std::int64_t tok, std::int64_t k) {
        return t.data[static_cast<std::size_t>((l * T + tok) * K + k)];
      };
      // (a) layer × K, mean over tokens: which layers and heads use the mechanism.
      Panel a;
      a.title = name + ": mean over " + plural(T, tn);
      a.x = Axis{ln, L, 1};
      a.y = Axis{kn, K, 1};
      a.x_first = true;
      a.unit_scale = unit;
      a.ch = row_height(K);
      a.cw = std::clamp(480.0 / static_cast<double>(L), 4.0, 28.0);
      a.cells.resize(static_cast<std::size_t>(K * L));
      for (std::int64_t l = 0; l < L; ++l)
        for (std::int64_t tok = 0; tok < T; ++tok)
          for (std::int64_t k = 0; k < K; ++k) {
            a.cells[static_cast<std::size_t>(k * L + l)].add(at(l, tok, k));
            a.nonfinite.add(at(l, tok, k));
          }
      a.notes.push_back("shape " + shape_string(t.shape) + " = (" + ln + ", " + tn + ", " + kn + ")");
      // Layers without a single finite value are usually layers without the mechanism (a model
      // trace records NaN there): name them rather than leave the reader to guess.
      std::vector<std::int64_t> empty_layers;
      for (std::int64_t l = 0; l < L; ++l) {
        bool any = false;
        for (std::int64_t i = 0; i < T * K && !any; ++i) any = std::isfinite(t.data[static_cast<std::size_t>(l * T * K + i)]);
        if (!any) empty_layers.push_back(l);
      }
      if (!empty_layers.empty()) {
        std::string l = "no finite value in " + ln + (empty_layers.size() == 1 ? " " : "s ");
        for (std::size_t i = 0; i < empty_layers.size() && i < 16; ++i) l += (i ? ", " : "") + std::to_string(empty_layers[i]);
        if (empty_layers.size() > 16) l += ", ... (" + std::to_string(empty_layers.size()) + " in all)";
        a.notes.push_back(l);
      }
      y += draw_panel(d, a, x0, y) + 14;

      // (b) token × K for one layer: where in the sequence it acts.
      std::int64_t layer = opt.strip_layer;
      if (layer < 0) {
        layer = L - 1;
        while (layer > 0 && std::find(empty_layers.begin(), empty_layers.end(), layer) != empty_layers.end()) --layer;
        if (std::find(empty_layers.begin(), empty_layers.end(), layer) != empty_layers.end()) layer = L - 1;
      }
      Panel b;
      b.x = token_axis(tn, T, opt.max_tokens);
      b.y = Axis{kn, K, 1};
      b.title = name + ", " + ln + " " + std::to_string(layer) + ": per " + tn;
      if (b.x.bin > 1) b.title += " (means over bins of " + plural(b.x.bin, tn) + ")";
      b.x_first = true;
      b.unit_scale = unit;
      b.ch = row_height(K);
      b.cw = token_cell_width(b.x.cells());
      const std::int64_t cols = b.x.cells();
      b.cells.resize(static_cast<std::size_t>(K * cols));
      for (std::int64_t tok = 0; tok < T; ++tok)
        for (std::int64_t k = 0; k < K; ++k) {
          b.cells[static_cast<std::size_t>(k * cols + tok / b.x.bin)].add(at(layer, tok, k));
          b.nonfinite.add(at(layer, tok, k));
        }
      if (b.x.bin > 1) b.notes.push_back(bin_note(b.x, opt.max_tokens));
      y += draw_panel(d, b, x0, y) + 26;
    } else {
      const std::int64_t S = t.shape[0], T = t.shape[1];
      const std::string rn = dim(0, "row"), tn = dim(1, "token");
      Panel p;
      p.x = token_axis(tn, T, opt.max_tokens);
      p.y = Axis{rn, S, 1};
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
