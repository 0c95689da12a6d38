#include "json.hpp"

#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace shallow_ensemble {

Json::Json(std::vector<double> values): kind_(Kind::Array) {
    for (auto value: values) {
        items_.emplace_back(value);
    }
}

Json::Json(std::vector<int64_t> values): kind_(Kind::Array) {
    for (auto value: values) {
        items_.emplace_back(value);
    }
}

Json& Json::push(Json value) {
    if (kind_ != Kind::Array) {
        throw std::logic_error("Json::push on a non-array");
    }
    items_.push_back(std::move(value));
    return *this;
}

Json& Json::set(const std::string& key, Json value) {
    if (kind_ != Kind::Object) {
        throw std::logic_error("Json::set on a non-object");
    }
    for (auto& member: members_) {
        if (member.first == key) {
            member.second = std::move(value);
            return *this;
        }
    }
    members_.emplace_back(key, std::move(value));
    return *this;
}

std::string Json::dump(int indent) const {
    std::string out;
    this->write(out, indent, 0);
    out += "\n";
    return out;
}

namespace {

void write_string(std::string& out, const std::string& value) {
    out += '"';
    for (char c: value) {
        switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\t': out += "\\t"; break;
        case '\r': out += "\\r"; break;
        default:
            if (static_cast<unsigned char>(c) < 0x20) {
                char buffer[8];
                std::snprintf(buffer, sizeof(buffer), "\\u%04x", c);
                out += buffer;
            } else {
                out += c;
            }
        }
    }
    out += '"';
}

void newline(std::string& out, int indent, int depth) {
    if (indent > 0) {
        out += '\n';
        out.append(static_cast<size_t>(indent * depth), ' ');
    }
}

}  // namespace

void Json::write(std::string& out, int indent, int depth) const {
    switch (kind_) {
    case Kind::Null:
        out += "null";
        break;
    case Kind::Number: {
        if (!std::isfinite(number_)) {
            out += "null";  // JSON has no NaN/inf
            break;
        }
        char buffer[32];
        std::snprintf(buffer, sizeof(buffer), "%.17g", number_);
        out += buffer;
        break;
    }
    case Kind::Integer:
        out += std::to_string(integer_);
        break;
    case Kind::Bool:
        out += boolean_ ? "true" : "false";
        break;
    case Kind::String:
        write_string(out, string_);
        break;
    case Kind::Array: {
        // arrays of scalars stay on one line
        bool flat = true;
        for (const auto& item: items_) {
            flat = flat && item.kind_ != Kind::Array && item.kind_ != Kind::Object;
        }
        out += '[';
        for (size_t i = 0; i < items_.size(); i++) {
            if (i != 0) {
                out += flat ? ", " : ",";
            }
            if (!flat) {
                newline(out, indent, depth + 1);
            }
            items_[i].write(out, indent, depth + 1);
        }
        if (!flat && !items_.empty()) {
            newline(out, indent, depth);
        }
        out += ']';
        break;
    }
    case Kind::Object:
        out += '{';
        for (size_t i = 0; i < members_.size(); i++) {
            if (i != 0) {
                out += ',';
            }
            newline(out, indent, depth + 1);
            write_string(out, members_[i].first);
            out += ": ";
            members_[i].second.write(out, indent, depth + 1);
        }
        if (!members_.empty()) {
            newline(out, indent, depth);
        }
        out += '}';
        break;
    }
}

}  // namespace shallow_ensemble
