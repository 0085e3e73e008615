// attnkit/text/chat.hpp — Qwen3's chat template, written out in C++.
//
// Contract: apply_qwen3_chat_template() returns byte for byte what the Jinja chat_template of
// Qwen3's tokenizer_config.json renders for system, user and assistant messages without tools:
//   * a system message first: "<|im_start|>system\n" + content + "<|im_end|>\n"; a system message
//     later, and every user message: "<|im_start|>" + role + "\n" + content + "<|im_end|>\n";
//   * an assistant message whose content holds "</think>" is split: the answer is the text after
//     the last "</think>" (leading newlines dropped), the reasoning the text between the last
//     "<think>" and the first "</think>" (newlines trimmed). Before the last user query (the last
//     user message that is not a wrapped "<tool_response>...</tool_response>") only the answer is
//     kept; after it, the message is "<think>\n" + reasoning + "\n</think>\n\n" + answer when it is
//     the last message or has reasoning;
//   * add_generation_prompt appends "<|im_start|>assistant\n", and enable_thinking = false then
//     appends the empty think block "<think>\n\n</think>\n\n".
// Any other role (tool messages included) is an attnkit::Error naming the message and the role
// (the template itself would skip unknown roles in silence); so is an empty list (the template
// fails on messages[0]).
// qwen3_next_turn() is what follows a reply the model ended (its <|im_end|> sampled, not yet in
// the context) when the conversation goes on: it continues a KV cache without re-rendering it.
#pragma once

#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "attnkit/core/error.hpp"

namespace attnkit::text {

struct ChatMessage {
  std::string role;  // "system", "user" or "assistant"
  std::string content;
};

namespace detail_chat {

// Python's str.lstrip / rstrip / strip with a set of characters.
inline std::string_view lstrip(std::string_view s, std::string_view chars) {
  const auto b = s.find_first_not_of(chars);
  return b == std::string_view::npos ? std::string_view() : s.substr(b);
}
inline std::string_view rstrip(std::string_view s, std::string_view chars) {
  const auto e = s.find_last_not_of(chars);
  return e == std::string_view::npos ? std::string_view() : s.substr(0, e + 1);
}
inline std::string_view strip(std::string_view s, std::string_view chars) { return rstrip(lstrip(s, chars), chars); }

inline bool starts_with(std::string_view s, std::string_view p) { return s.substr(0, p.size()) == p; }
inline bool ends_with(std::string_view s, std::string_view p) {
  return s.size() >= p.size() && s.substr(s.size() - p.size()) == p;
}

}  // namespace detail_chat

inline std::string apply_qwen3_chat_template(std::span<const ChatMessage> messages, bool add_generation_prompt = true,
                                             bool enable_thinking = true) {
  using namespace detail_chat;
  const std::size_t n = messages.size();
  ATTNKIT_REQUIRE(n > 0, "apply_qwen3_chat_template: argument 'messages': empty (the template reads messages[0])");
  for (std::size_t i = 0; i < n; ++i) {
    const std::string& r = messages[i].role;
    ATTNKIT_REQUIRE(r == "system" || r == "user" || r == "assistant", "apply_qwen3_chat_template: message ", i,
                    ": role '", r, "' is not supported (system, user, assistant)");
  }
  std::string out;
  if (messages[0].role == "system") out += "<|im_start|>system\n" + messages[0].content + "<|im_end|>\n";

  // The last user query; with none, the last index (so no assistant message counts as after it).
  std::ptrdiff_t last_query = static_cast<std::ptrdiff_t>(n) - 1;
  for (std::ptrdiff_t i = static_cast<std::ptrdiff_t>(n) - 1; i >= 0; --i) {
    const ChatMessage& m = messages[static_cast<std::size_t>(i)];
    if (m.role == "user" && !(starts_with(m.content, "<tool_response>") && ends_with(m.content, "</tool_response>"))) {
      last_query = i;
      break;
    }
  }

  for (std::size_t i = 0; i < n; ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user" || (m.role == "system" && i > 0)) {
      out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    } else if (m.role == "assistant") {
      std::string_view content = m.content, reasoning;
      const std::string_view full = m.content;
      if (full.find("</think>") != std::string_view::npos) {
        content = lstrip(full.substr(full.rfind("</think>") + 8), "\n");           // split('</think>')[-1]
        std::string_view before = rstrip(full.substr(0, full.find("</think>")), "\n");  // split('</think>')[0]
        const auto open = before.rfind("<think>");                                 // .split('<think>')[-1]
        if (open != std::string_view::npos) before = before.substr(open + 7);
        reasoning = lstrip(before, "\n");
      }
      const bool after_last_query = static_cast<std::ptrdiff_t>(i) > last_query;
      if (after_last_query && (i + 1 == n || !reasoning.empty())) {
        out += "<|im_start|>assistant\n<think>\n";
        out += strip(reasoning, "\n");
        out += "\n</think>\n\n";
        out += lstrip(content, "\n");
      } else {
        out += "<|im_start|>assistant\n";
        out += content;
      }
      out += "<|im_end|>\n";
    }
    // A system message first was written above.
  }
  if (add_generation_prompt) {
    out += "<|im_start|>assistant\n";
    if (!enable_thinking) out += "<think>\n\n</think>\n\n";
  }
  return out;
}

inline std::string apply_qwen3_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt = true,
                                             bool enable_thinking = true) {
  return apply_qwen3_chat_template(std::span<const ChatMessage>(messages), add_generation_prompt, enable_thinking);
}

// The text that continues a conversation after a reply the model ended: the reply's
// "<|im_end|>\n", the user's turn and the generation prompt, as the template renders them when
// the whole conversation is rendered again (the reply itself stays as generated, thinking
// included: a KV cache keeps it).
inline std::string qwen3_next_turn(const std::string& user_content, bool enable_thinking = true) {
  const std::vector<ChatMessage> turn{{"user", user_content}};
  return "<|im_end|>\n" + apply_qwen3_chat_template(turn, true, enable_thinking);
}

}  // namespace attnkit::text
