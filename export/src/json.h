// A small JSON reader for bundle.json (objects, arrays, strings, numbers, true/false/null).
// Enough for the C++ runtime to read a bundle without a third-party library; errors name
// the byte offset. Not a general-purpose parser: no \u escapes beyond the BMP.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace lsr::json {

struct Value {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  bool b = false;
  double num = 0;
  std::string str;  // a String's text; a Number's literal as written ("12", "1e12", "NaN")
  std::vector<Value> arr;
  std::map<std::string, Value> obj;

  bool has(const std::string& key) const { return kind == Object && obj.count(key) > 0; }
  const Value& at(const std::string& key) const {
    if (kind != Object) throw std::runtime_error("expected an object around key \"" + key + "\"");
    auto it = obj.find(key);
    if (it == obj.end()) throw std::runtime_error("missing key \"" + key + "\"");
    return it->second;
  }
  double number(const std::string& what = "value") const {
    if (kind != Number) throw std::runtime_error(what + " must be a number");
    return num;
  }
  const std::string& string(const std::string& what = "value") const {
    if (kind != String) throw std::runtime_error(what + " must be a string");
    return str;
  }
};

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value parse() {
    Value v = value();
    ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void fail(const std::string& msg) const {
    throw std::runtime_error("invalid JSON at byte " + std::to_string(i_) + ": " + msg);
  }
  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  bool eat(char c) {
    ws();
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  void expect(char c) {
    if (!eat(c)) fail(std::string("expected '") + c + "'");
  }
  bool literal(const char* word) {
    const std::string w(word);
    if (s_.compare(i_, w.size(), w) == 0) {
      i_ += w.size();
      return true;
    }
    return false;
  }

  // bounded nesting: a hostile file cannot exhaust the stack (bundle.json nests 3 deep)
  static constexpr int kMaxDepth = 64;
  int depth_ = 0;
  struct Nest {
    Parser& p;
    explicit Nest(Parser& parser) : p(parser) {
      if (++p.depth_ > kMaxDepth) p.fail("nested deeper than " + std::to_string(kMaxDepth));
    }
    ~Nest() { --p.depth_; }
  };

  Value value() {
    ws();
    if (i_ >= s_.size()) fail("unexpected end");
    Nest nest(*this);
    Value v;
    const char c = s_[i_];
    if (c == '{') {
      ++i_;
      v.kind = Value::Object;
      if (eat('}')) return v;
      do {
        ws();
        std::string key = string_lit();
        expect(':');
        v.obj[key] = value();
      } while (eat(','));
      expect('}');
    } else if (c == '[') {
      ++i_;
      v.kind = Value::Array;
      if (eat(']')) return v;
      do v.arr.push_back(value());
      while (eat(','));
      expect(']');
    } else if (c == '"') {
      v.kind = Value::String;
      v.str = string_lit();
    } else if (literal("true")) {
      v.kind = Value::Bool;
      v.b = true;
    } else if (literal("false")) {
      v.kind = Value::Bool;
    } else if (literal("null")) {
      v.kind = Value::Null;
    } else if (literal("NaN")) {  // Python's json writes NaN and +-Infinity; read them, the rules refuse them
      v.kind = Value::Number;
      v.num = std::numeric_limits<double>::quiet_NaN();
      v.str = "NaN";
    } else if (literal("Infinity")) {
      v.kind = Value::Number;
      v.num = std::numeric_limits<double>::infinity();
      v.str = "Infinity";
    } else if (literal("-Infinity")) {
      v.kind = Value::Number;
      v.num = -std::numeric_limits<double>::infinity();
      v.str = "-Infinity";
    } else {
      // the JSON grammar: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? (strtod alone would
      // also take hex, "inf", "nan" and a leading "+")
      const size_t begin = i_;
      auto digits = [&] {
        const size_t d0 = i_;
        while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
        return i_ - d0;
      };
      if (i_ < s_.size() && s_[i_] == '-') ++i_;
      if (i_ < s_.size() && s_[i_] == '0') {
        ++i_;
      } else if (digits() == 0) {
        i_ = begin;
        fail("unexpected character");
      }
      if (i_ < s_.size() && s_[i_] == '.') {
        ++i_;
        if (digits() == 0) fail("expected a digit after '.'");
      }
      if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
        ++i_;
        if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
        if (digits() == 0) fail("expected a digit in the exponent");
      }
      v.kind = Value::Number;
      v.str = s_.substr(begin, i_ - begin);  // the literal, for integers beyond double precision
      v.num = std::strtod(v.str.c_str(), nullptr);  // out of double range: +-inf, refused by the rules
    }
    return v;
  }

  std::string string_lit() {
    if (i_ >= s_.size() || s_[i_] != '"') fail("expected a string");
    ++i_;
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      char c = s_[i_++];
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unterminated escape");
      c = s_[i_++];
      switch (c) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {
          if (i_ + 4 > s_.size()) fail("bad \\u escape");
          unsigned cp = 0;
          for (size_t j = i_; j < i_ + 4; ++j) {
            const char h = s_[j];
            const int d = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10
                        : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
            if (d < 0) fail("bad \\u escape");
            cp = cp * 16 + static_cast<unsigned>(d);
          }
          i_ += 4;
          if (cp < 0x80) {
            out += static_cast<char>(cp);
          } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
          } else {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
          }
          break;
        }
        default: out += c;  // \" \\ \/
      }
    }
    if (i_ >= s_.size()) fail("unterminated string");
    ++i_;
    return out;
  }
};

inline Value parse(const std::string& text) { return Parser(text).parse(); }

// A JSON string literal for `s` (for writing results).
inline std::string quote(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

}  // namespace lsr::json
